"""Continuous batching in the engine: sequences join a running batch between steps (`Decoder.join`),
leave it (`Decoder.leave`), and the batch drafts or runs AR per step by its size (`max_draft_batch`).
The contract: every sequence's greedy output equals that prompt decoded alone with AR, whatever
joined or left around it and whenever the cache was compacted."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from tidar.decode import Decoder, GenerationConfig, generate
from tidar.model.config import TidarConfig
from tidar.model.transformer import KVCache

PROMPTS = [[5, 9, 13, 2], [7, 1, 1, 30, 22, 8, 3], [44], [9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 12], [60, 61, 62, 60, 61],
           [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46], [88, 12]]


def solo_ar(model, prompt, n):
    return generate(model, [prompt], GenerationConfig(mode="ar", max_new_tokens=n)).sequences[0]


def run(dec: Decoder, arrivals: dict[int, list[int]], budgets: list[int], cancel: dict[int, int] | None = None
        ) -> tuple[dict[int, list[int]], list[int]]:
    """Decode with prompt k joining before step arrivals[k]; returns each prompt's tokens and the
    batch size of every step. `cancel[k] = s`: prompt k leaves before step s, unfinished."""
    dec.open()
    out: dict[int, list[int]] = {}
    rows: list[int] = []  # prompt index of each batch row
    sizes, step, cancel = [], 0, cancel or {}
    while len(out) < len(arrivals) or rows:
        joining = [k for k, s in arrivals.items() if s == step]
        if joining:
            first = dec.join([PROMPTS[k] for k in joining], [budgets[k] for k in joining])
            rows += joining
            out.update({k: list(f) for k, f in zip(joining, first, strict=True)})
        gone = [r for r, k in enumerate(rows) if dec.state.done[r] or cancel.get(k) == step]
        if gone:
            dec.leave(gone)
            rows = [k for r, k in enumerate(rows) if r not in gone]
        if rows:
            sizes.append(len(rows))
            for k, toks in zip(rows, dec.step(), strict=True):
                out[k].extend(toks)
        step += 1
        assert step < 500, "the batch never drained"
    return out, sizes


ARRIVALS = {0: 0, 1: 0, 2: 2, 3: 5, 4: 5, 5: 9, 6: 30}  # prompt -> the step before which it joins


@pytest.mark.parametrize("draft", [dict(block_size=3), dict(block_size=4, lookup_ngram=2, lookup_tokens=6),
                                   dict(block_size=4, policy="full", max_draft_batch=2)])
def test_sequences_joining_at_different_steps_decode_as_alone(draft):
    model = tiny_model(seed=3)
    budgets = [24, 40, 17, 33, 8, 29, 12]
    out, sizes = run(Decoder(model, GenerationConfig(max_new_tokens=64, **draft)), ARRIVALS, budgets)
    for k, p in enumerate(PROMPTS):
        assert out[k] == solo_ar(model, p, budgets[k]), f"prompt {k}"
    assert max(sizes) >= 4 and sizes[-1] == 1  # rows really overlapped, and left one by one


def kernel_model(dtype: torch.dtype):
    """head_dim 16: the engine's compiled attention kernel, whose result ignores which slot a key sits in."""
    model = tiny_model(seed=4, hidden_size=64, intermediate_size=128).to(dtype)
    model.fuse_for_inference()
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_joining_and_compaction_are_exact_on_the_kernel_path(dtype, monkeypatch):
    model = kernel_model(dtype)
    if not model.kernels_on:
        pytest.skip("the CPU kernels did not build here")
    budgets = [30] * len(PROMPTS)
    expected = [solo_ar(model, p, 30) for p in PROMPTS]
    dec = Decoder(model, GenerationConfig(max_new_tokens=30, block_size=4, lookup_ngram=2))
    out, _ = run(dec, ARRIVALS, budgets)
    assert [out[k] for k in range(len(PROMPTS))] == expected
    compactions = [0]
    original = KVCache.compact

    def always(self):  # move every committed entry before every step
        compactions[0] += 1
        original(self)

    monkeypatch.setattr(Decoder, "_compact", lambda self, st: always(st.cache))
    out, _ = run(Decoder(model, GenerationConfig(max_new_tokens=30, block_size=4, lookup_ngram=2)), ARRIVALS, budgets)
    assert [out[k] for k in range(len(PROMPTS))] == expected and compactions[0] > 20


def test_leaving_mid_way_leaves_the_others_untouched():
    model = tiny_model(seed=5)
    budgets = [40] * len(PROMPTS)
    out, _ = run(Decoder(model, GenerationConfig(max_new_tokens=40, block_size=3, lookup_ngram=2)), ARRIVALS, budgets,
                 cancel={1: 3, 3: 8})
    for k, p in enumerate(PROMPTS):
        full = solo_ar(model, p, 40)
        if k in (1, 3):
            assert 0 < len(out[k]) < 40 and out[k] == full[: len(out[k])]
        else:
            assert out[k] == full


def test_a_batch_past_max_draft_batch_steps_as_ar_and_drafts_again_once_rows_leave():
    model = tiny_model(seed=6)
    dec = Decoder(model, GenerationConfig(max_new_tokens=40, block_size=3, max_draft_batch=2))
    rows_per_step = []
    original = dec._forward_step

    def spy(st, lay):
        rows_per_step.append((len(st.done), lay.num_tokens))
        return original(st, lay)

    dec._forward_step = spy
    budgets = [6, 6, 40, 40]
    out, _ = run(dec, {0: 0, 1: 0, 2: 0, 3: 0}, budgets)
    assert [out[k] for k in range(4)] == [solo_ar(model, PROMPTS[k], budgets[k]) for k in range(4)]
    assert {t for b, t in rows_per_step if b > 2} == {1}  # 4 or 3 sequences: one row each (AR)
    assert any(t > 1 for b, t in rows_per_step if b <= 2)  # two left: [MASK] blocks again
    st = dec.state
    assert st is not None and st.stats.mode == "tidar"


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_sampling_through_ar_and_drafting_steps_and_joins(beta):
    """A sampled batch that switches between AR and drafting steps and takes joins: after an AR step
    the next drafting step verifies an empty draft, which still needs its proposal distributions."""
    model = tiny_model(seed=8)
    dec = Decoder(model, GenerationConfig(max_new_tokens=30, block_size=3, max_draft_batch=2, do_sample=True,
                                          temperature=0.9, seed=3, beta=beta))
    budgets = [5, 30, 9, 30, 30, 3, 30]
    out, sizes = run(dec, ARRIVALS, budgets)
    assert [len(out[k]) for k in range(len(PROMPTS))] == budgets  # the tiny model has no EOS
    assert min(sizes) <= 2 < max(sizes)  # both kinds of step ran
    assert dec.state is None or dec.state.stats.mode == "tidar"


def test_row_statistics_count_each_sequence_and_add_up_to_the_batch():
    model = tiny_model(seed=7)
    dec = Decoder(model, GenerationConfig(max_new_tokens=20, block_size=4))
    dec.open()
    dec.join([PROMPTS[0], PROMPTS[1]], [20, 9])
    dec.step()
    dec.join([PROMPTS[2]], [20])
    while not all(dec.state.done):
        dec.step()
    st = dec.state
    assert [r.generated_tokens for r in st.row_stats] == [20, 9, 20]
    assert sum(r.generated_tokens for r in st.row_stats) == st.stats.generated_tokens
    assert sum(sum(r.acceptance_histogram) for r in st.row_stats) == sum(st.stats.acceptance_histogram)
    # a row counts the forwards it was in: the last one joined after the first step and ended the batch
    assert st.stats.forwards == 1 + st.row_stats[2].forwards
    assert all(r.forwards == r.sequence_steps for r in st.row_stats)
    assert all(r.mode == "tidar" for r in st.row_stats)


def test_kv_cache_compaction_keeps_each_rows_entries_in_order():
    cfg = TidarConfig(vocab_size=11, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64)
    cache = KVCache(cfg, 2, 20, torch.float32)
    k, v = cache.layers(0, 10)[0]
    k.copy_(torch.arange(k.numel(), dtype=torch.float32).view_as(k))
    v.copy_(torch.arange(v.numel(), dtype=torch.float32).view_as(v))
    valid = torch.tensor([[1, 0, 1, 1, 0, 0, 0, 1, 0, 0],
                          [0, 0, 0, 0, 1, 1, 0, 0, 0, 1]], dtype=torch.bool)
    cache.valid[:, :10] = valid
    cache.length = 10
    before_k, before_v = k.clone(), v.clone()
    cache.compact()
    assert cache.length == 4
    assert cache.valid[:, :4].tolist() == [[True] * 4, [False, True, True, True]]
    assert not cache.valid[:, 4:].any()
    ck, cv = cache.k[0], cache.v[0]
    assert torch.equal(ck[0, ..., :4], before_k[0, ..., [0, 2, 3, 7]])
    assert torch.equal(ck[1, ..., 1:4], before_k[1, ..., [4, 5, 9]])
    assert torch.equal(cv[0, :, :4], before_v[0, :, [0, 2, 3, 7]])
    assert torch.equal(cv[1, :, 1:4], before_v[1, :, [4, 5, 9]])
