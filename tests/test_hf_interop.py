"""`tidar export --hf`: the exported directory opens in transformers (trust_remote_code), its logits are
our Transformer's, and its TiDAR `generate()` (custom_generate) is lossless: greedy equals our engine
and transformers' own greedy loop, sampling follows AR's distribution."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from test_decoding import THRESHOLD, chi_square, exact_two_token_dist

from tidar.cli.export import main as export_main
from tidar.decode import Decoder, GenerationConfig, generate
from tidar.decode.options import DIFFUSION_ONLY
from tidar.masks import causal_mask, step_layout
from tidar.model.config import AdapterConfig
from tidar.model.weights import load_model, save_adapter, save_pretrained

transformers = pytest.importorskip("transformers")
EXPORT_FILES = ["config.json", "configuration_tidar.py", "custom_generate/generate.py", "model.safetensors", "modeling_tidar.py"]


def tiny_adapter(tmp: Path, seed: int = 7, std: float | None = None, **overrides) -> Path:
    """An adapter directory (manifest + adapter weights) on a tiny base checkpoint, with a random,
    non-zero adapter and [MASK] embedding, so a forward that skipped them would differ."""
    model = tiny_model(seed=seed, **overrides)
    if std is not None:
        model.init_weights(std=std, seed=seed)
    base = save_pretrained(model, tmp / "base")
    model.add_adapter(AdapterConfig(rank=4, alpha=8.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return save_adapter(model, tmp / "adapter", {"base": str(base)})


def export(src: Path, out: Path) -> tuple:
    """`tidar export --hf out --model src`, then our model and transformers' load of the export."""
    assert export_main(["--hf", str(out), "--model", str(src)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    return load_model(src), hf.eval(), out


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    tmp = tmp_path_factory.mktemp("hf")
    return export(tiny_adapter(tmp), tmp / "export")


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def new_tokens(out: torch.Tensor, prompt: list[int]) -> list[int]:
    assert out.shape[0] == 1 and out[0, : len(prompt)].tolist() == prompt
    return out[0, len(prompt):].tolist()


def test_export_writes_a_directory_transformers_opens(exported, capsys) -> None:
    _, hf, out = exported
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == EXPORT_FILES
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "tidar" and config["architectures"] == ["TidarForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "configuration_tidar.TidarConfig",
                                  "AutoModelForCausalLM": "modeling_tidar.TidarForCausalLM"}
    assert config["tidar"]["mask_token_id"] == 97 and config["tidar"]["block_size"] == 4
    assert config["tidar"]["adapter"]["rank"] == 4 and config["tidar"]["adapter"]["alpha"] == 8.0
    assert type(hf).__name__ == "TidarForCausalLM" and len(hf.adapter_modules) == 2 * 7
    # transformers swaps in the directory's custom_generate/generate.py as the model's generate()
    assert hf.generate.func.__module__.endswith("generate") and hf.generate.func.__name__ == "generate"
    # the export replaces an earlier export, never another directory
    assert export_main(["--hf", str(out), "--model", str(out.parent / "adapter")]) == 0
    assert export_main(["--hf", str(out.parent / "adapter"), "--model", str(out.parent / "adapter")]) == 2
    assert "not an earlier `tidar export --hf`" in capsys.readouterr().err


def test_logits_equal_our_transformer_on_causal_and_mask_rows(exported) -> None:
    ours, hf, out = exported
    ids = torch.tensor([prompts(1, seed=1)[0] + [5, 6, 7]])
    n = ids.shape[1]
    with torch.no_grad():
        # a plain causal forward: the base Llama, through transformers' own forward
        assert torch.allclose(hf(ids).logits, ours(ids, torch.arange(n)[None], causal_mask(n)), atol=1e-5)
        # a TiDAR step: 5 causal draft rows and a [MASK] block for each acceptance length 1..4
        lay = step_layout(5, 4, (1, 2, 3, 4))
        step = torch.cat([ids[:, :5], torch.full((1, 16), 97)], dim=1)
        theirs = hf.tidar_logits(step, lay.position_offsets[None], lay.mask[None])
        mine = ours(step, lay.position_offsets[None], lay.mask)
        assert torch.allclose(theirs, mine, atol=1e-5)
        # and the adapter matters there (the comparison above can fail): without it only the causal rows agree
        ours_bare = load_model(out.parent / "adapter")
        for name, p in ours_bare.named_parameters():
            if "lora_b" in name:
                p.zero_()
        bare = ours_bare(step, lay.position_offsets[None], lay.mask)
    assert torch.allclose(bare[:, :5], theirs[:, :5], atol=1e-5)
    assert (bare[:, 5:] - theirs[:, 5:]).abs().max() > 1e-2


def test_greedy_generate_equals_our_engine_and_transformers_greedy(exported) -> None:
    ours, hf, out = exported
    for p in prompts(4, seed=2):
        ids = torch.tensor([p])
        engine = generate(ours, [p], GenerationConfig(max_new_tokens=24)).sequences[0]
        stats: dict = {}
        tidar = new_tokens(hf.generate(ids, max_new_tokens=24, do_sample=False, tidar_stats=stats), p)
        ar = new_tokens(type(hf).generate(hf, ids, max_new_tokens=24, do_sample=False), p)
        assert tidar == engine == ar
        assert stats["new_tokens"] == 24 and stats["forwards"] <= 24
        # transformers' own route to a custom generate, on the same model, and the AR way out
        via = type(hf).generate(hf, ids, custom_generate=str(out), trust_remote_code=True, max_new_tokens=24)
        assert new_tokens(via, p) == engine
        assert new_tokens(hf.generate(ids, max_new_tokens=24, tidar=False), p) == engine
    for b in (1, 2, 3):
        p = prompts(1, seed=b)[0]
        assert new_tokens(hf.generate(torch.tensor([p]), max_new_tokens=16, block_size=b), p) == \
            generate(ours, [p], GenerationConfig(max_new_tokens=16, mode="ar")).sequences[0]


def oracle_tokens(ref: list[int], e: int, n: int) -> list[int]:
    """The true next n drafts after e emitted tokens, one of them wrong unless e % 3 == 0: acceptance
    lengths 1, 2 and full in turn."""
    true = (ref[e: e + n] + [0] * n)[:n]
    if e % 3:
        true[e % 3 - 1] = (true[e % 3 - 1] + 1) % 97
    return true


class RecordingDecoder(Decoder):
    """Our engine, recording each draft it makes, then verifying `oracle_tokens` instead."""

    def __init__(self, model, cfg, ref) -> None:  # noqa: ANN001
        super().__init__(model, cfg)
        self.ref, self.drafts = ref, []

    def _next_drafts(self, st, bonus, block_logits, shift) -> None:  # noqa: ANN001
        super()._next_drafts(st, bonus, block_logits, shift)
        self.drafts.append(st.drafts[0].tolist())
        st.drafts[0, 1:] = torch.tensor(oracle_tokens(self.ref, st.stats.generated_tokens, st.drafts.shape[1] - 1))


def test_drafts_are_tidar_s_own(exported, monkeypatch) -> None:
    """The same layouts, and the same draft from the same [MASK] block after each acceptance length,
    as our engine running TiDAR as in the paper (greedy output alone would not notice a wrong layout
    or block: bad drafts are only rejected)."""
    ours, hf, _ = exported
    mod = remote_module(hf)
    for n, b, lengths in ((3, 4, (1, 2, 3)), (4, 3, (1, 2, 3)), (2, 2, (1, 2)), (5, 1, ())):
        allowed, positions = mod.step_layout(n, b, range(1, len(lengths) + 1))
        lay = step_layout(n, b, lengths)
        assert allowed.equal(lay.mask) and positions == lay.position_offsets.tolist()
    p = prompts(1, seed=9)[0]
    ref = generate(ours, [p], GenerationConfig(max_new_tokens=48, mode="ar")).sequences[0]
    engine = RecordingDecoder(ours, GenerationConfig(max_new_tokens=40, block_size=4, **DIFFUSION_ONLY), ref)
    assert [t for step in engine.stream([p]) for t in step[0]] == ref[:40]
    draft, recorded = mod.Decoder.draft, []

    def recording(self, bonus, block):  # noqa: ANN001, ANN202
        drafts, q = draft(self, bonus, block)
        recorded.append(drafts)
        return [bonus, *oracle_tokens(ref, self.cache.get_seq_length() - len(p) + 1, len(drafts) - 1)], q

    monkeypatch.setattr(mod.Decoder, "draft", recording)
    stats: dict = {}
    assert new_tokens(hf.generate(torch.tensor([p]), max_new_tokens=40, tidar_stats=stats), p) == ref[:40]
    # the engine drafts once more after its last step (unused)
    assert recorded == engine.drafts[: len(recorded)] and len(engine.drafts) - len(recorded) <= 1 and len(recorded) > 10
    assert stats["forwards"] == engine.stats.forwards + 1  # + the prefill


def remote_module(hf) -> object:
    return sys.modules[hf.generate.func.__module__]


@pytest.mark.parametrize("corrupt", [0.0, 0.5])
def test_good_drafts_are_accepted_and_the_cache_keeps_only_committed_tokens(exported, monkeypatch, corrupt) -> None:
    """Drafts replaced by the true continuation (sometimes corrupted): multi-token steps, full and partial
    acceptance; the output stays AR's and the cache equals a fresh causal pass over prompt + output."""
    _, hf, _ = exported
    mod = remote_module(hf)
    p = prompts(1, seed=5)[0]
    # longer than the 40 tokens decoded: the last step's drafts reach past them
    ref = new_tokens(type(hf).generate(hf, torch.tensor([p]), max_new_tokens=48, do_sample=False), p)
    draft, rng, seen = mod.Decoder.draft, torch.Generator().manual_seed(0), {}

    def oracle(self, bonus, block):  # noqa: ANN001, ANN202
        drafts, q = draft(self, bonus, block)
        e = self.cache.get_seq_length() - len(p) + 1  # tokens emitted so far, the bonus included
        true = (ref[e: e + len(drafts) - 1] + [0] * len(drafts))[: len(drafts) - 1]
        if torch.rand((), generator=rng) < corrupt:
            k = int(torch.randint(0, len(true), (), generator=rng))
            true[k] = (true[k] + 1) % 97
        seen["cache"] = self.cache
        return [bonus, *true], q

    monkeypatch.setattr(mod.Decoder, "draft", oracle)
    stats: dict = {}
    assert new_tokens(hf.generate(torch.tensor([p]), max_new_tokens=40, tidar_stats=stats), p) == ref[:40]
    if corrupt == 0.0:
        assert stats["new_tokens"] / stats["forwards"] > 3.0
    assert 0 < stats["accepted_drafts"] < 40
    cache = seen["cache"]
    n = cache.get_seq_length()
    fresh = transformers.DynamicCache(config=hf.config)
    with torch.no_grad():
        hf(torch.tensor([(p + ref)[:n]]), past_key_values=fresh, use_cache=True)
    for mine, theirs in zip(cache.layers, fresh.layers, strict=True):
        assert torch.allclose(mine.keys, theirs.keys, atol=1e-5) and torch.allclose(mine.values, theirs.values, atol=1e-5)


def test_batch_with_padding_eos_and_streamer(exported) -> None:
    ours, hf, _ = exported
    ps = prompts(3, seed=6)
    alone = [generate(ours, [p], GenerationConfig(max_new_tokens=12)).sequences[0] for p in ps]
    width = max(map(len, ps))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in ps])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12)
    assert out[:, :width].equal(ids) and out[:, width:].tolist() == alone
    # EOS ends a sequence after it (kept), as in transformers' loop; the rest is padding
    p, eos = ps[0], alone[0][5]
    stop = alone[0].index(eos) + 1
    got = hf.generate(torch.tensor([p]), max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert new_tokens(got, p) == alone[0][:stop]
    assert new_tokens(type(hf).generate(hf, torch.tensor([p]), max_new_tokens=12, eos_token_id=eos, pad_token_id=0), p) \
        == alone[0][:stop]

    class Collect(transformers.generation.BaseStreamer):
        def __init__(self) -> None:
            self.puts, self.ended = [], False

        def put(self, value: torch.Tensor) -> None:
            self.puts.append(value.tolist())

        def end(self) -> None:
            self.ended = True

    streamer = Collect()
    hf.generate(torch.tensor([ps[1]]), max_new_tokens=12, streamer=streamer)
    assert streamer.puts[0] == [ps[1]] and streamer.ended  # the prompt first, as transformers does
    assert [t for put in streamer.puts[1:] for t in put] == alone[1]


def test_unsupported_settings_are_refused_not_ignored(exported) -> None:
    _, hf, _ = exported
    ids = torch.tensor([[1, 2, 3]])
    for kw in (dict(num_beams=2), dict(repetition_penalty=1.3), dict(do_sample=True, typical_p=0.5)):
        with pytest.raises(NotImplementedError, match="tidar=False"):
            hf.generate(ids, max_new_tokens=4, **kw)
    with pytest.raises(TypeError, match="unexpected"):
        hf.generate(ids, max_new_tokens=4, bogus=1)


@pytest.fixture(scope="module")
def exported_v8(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A vocabulary of 8 with flat distributions: drafts are accepted and rejected often."""
    tmp = tmp_path_factory.mktemp("hf8")
    return export(tiny_adapter(tmp, seed=4, std=0.12, vocab_size=8), tmp / "export")


def sample_pairs(hf, prompt: list[int], n: int, **kw) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(1234)
    stats: dict = {}
    out = hf.generate(torch.tensor([prompt] * n), do_sample=True, max_new_tokens=2, block_size=2, tidar_stats=stats, **kw)
    counts = torch.zeros(8, 8)
    for a, b in out[:, len(prompt):].tolist():
        counts[a, b] += 1
    return counts, stats


@pytest.mark.parametrize("warp_kw", [dict(temperature=1.0), dict(temperature=0.8, top_k=5)])
def test_sampling_follows_the_ar_distribution(exported_v8, warp_kw) -> None:
    ours, hf, _ = exported_v8
    prompt, n = [1, 5, 2], 2000
    counts, stats = sample_pairs(hf, prompt, n, **warp_kw)
    stat, cells = chi_square(counts, exact_two_token_dist(ours, prompt, **warp_kw))
    assert cells >= 20 and stat < THRESHOLD, stat
    assert 100 < stats["accepted_drafts"] < n - 100  # one draft per row (b = 2): both the accept and the reject branch ran


def test_sampling_test_detects_a_wrong_acceptance_rule(exported_v8, monkeypatch) -> None:
    ours, hf, _ = exported_v8
    mod = remote_module(hf)
    accept = mod.speculative_accept
    monkeypatch.setattr(mod, "speculative_accept", lambda drafts, p, q: (len(drafts), accept(drafts, p, q)[1]))
    counts, _ = sample_pairs(hf, [1, 5, 2], 1000)
    stat, _ = chi_square(counts, exact_two_token_dist(ours, [1, 5, 2]))
    assert stat > 3 * THRESHOLD  # about 2500 here


def test_the_export_runs_where_tidar_is_not_installed(exported) -> None:
    ours, hf, out = exported
    p = prompts(1, seed=8)[0]
    script = ("import sys, torch\nsys.modules['tidar'] = None  # any import of tidar fails\n"
              "from transformers import AutoModelForCausalLM\n"
              f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
              f"print(m.generate(torch.tensor([{p}]), max_new_tokens=10)[0].tolist())\n")
    env = {**os.environ, "PYTHONPATH": ""}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=out.parent, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == p + generate(ours, [p], GenerationConfig(max_new_tokens=10)).sequences[0]


@pytest.mark.slow
def test_shipped_model_export_greedy_equals_tidar_generate(tmp_path: Path, capsys) -> None:
    from tidar.cli.generate import main as generate_main

    prompt = 'def is_palindrome(s: str) -> bool:\n    """Return True if s reads the same backwards."""\n'
    t0 = time.perf_counter()
    assert export_main(["--hf", str(tmp_path / "smollm2-tidar")]) == 0
    capsys.readouterr()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "smollm2-tidar", trust_remote_code=True)
    # AutoTokenizer reads the config too: without trust_remote_code it would ask on stdin
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "smollm2-tidar", trust_remote_code=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    stats: dict = {}
    got = hf.generate(ids, max_new_tokens=32, do_sample=False, tidar_stats=stats)[0, ids.shape[1]:].tolist()
    assert generate_main(["--prompt", prompt, "--max-new-tokens", "32", "--dtype", "float32", "--json"]) == 0
    assert got == json.loads(capsys.readouterr().out)["tokens"]
    assert hf.generate(ids, max_new_tokens=32, tidar=False)[0, ids.shape[1]:].tolist() == got  # transformers' AR loop
    assert stats["forwards"] < 32  # the trained adapter's drafts are accepted
    print(f"export + load + 32 tokens: {time.perf_counter() - t0:.1f}s, {stats}")
