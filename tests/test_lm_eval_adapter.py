"""lm-eval adapter: scoring equals a hand log_softmax computation on a tiny model; the registered
"tidar" class answers loglikelihood, loglikelihood_rolling and generate_until (when lm-eval is
installed)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from tidar.masks import causal_mask
from tidar.runtime import Runtime
from tidar.serve.lm_eval import (
    encode_pair,
    generate_until_text,
    loglikelihood_of,
    rolling_loglikelihood,
    rolling_windows,
    score_tokens,
)


class CharTokenizer:
    """97 ids like the tiny model: 0 = EOS, 1..95 = printable ASCII, 96 = newline."""

    eos_token_id = 0
    bos_token_id = None
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [96 if c == "\n" else ord(c) - 31 for c in text]

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:  # noqa: ANN001
        return "".join("\n" if i == 96 else chr(i + 31) for i in ids if i != 0 or not skip_special_tokens)


@pytest.fixture(scope="module")
def rt() -> Runtime:
    return Runtime(tiny_model(), CharTokenizer(), name="tiny")


def hand_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """log P(tokens[i] | tokens[:i]) for i >= 1, straight from the model's logits."""
    ids = torch.tensor([tokens[:-1]])
    T = ids.shape[1]
    with torch.no_grad():
        logits = model(ids, torch.arange(T)[None], causal_mask(T)[None, None]).float()
    logp = torch.log_softmax(logits[0], dim=-1)
    return logp[torch.arange(T), torch.tensor(tokens[1:])]


def test_loglikelihood_equals_hand_computation(rt):
    enc = rt.tokenizer.encode
    ll, greedy = loglikelihood_of(rt, "Hello", " world")
    expected = hand_logprobs(rt.model, enc("Hello world"))[-len(" world"):].sum().item()
    assert ll == pytest.approx(expected, abs=1e-4)
    assert isinstance(greedy, bool)
    # trailing context spaces move to the continuation, like lm-eval's causal models
    assert encode_pair(rt, "Hello ", "world") == (enc("Hello"), enc(" world"))
    assert loglikelihood_of(rt, "Hello ", "world")[0] == pytest.approx(ll, abs=1e-5)
    assert loglikelihood_of(rt, "Hello", "") == (0.0, True)


def test_empty_context_is_conditioned_on_the_prefix_token(rt):
    ll, _ = loglikelihood_of(rt, "", "abc")
    expected = hand_logprobs(rt.model, [0] + rt.tokenizer.encode("abc")).sum().item()  # EOS (0) as the prefix
    assert ll == pytest.approx(expected, abs=1e-4)


def test_is_greedy_matches_greedy_decoding(rt):
    gen = rt.generation_config(mode="ar", max_new_tokens=6, do_sample=False)
    out = rt.generate_text("greedy?", gen)
    assert 0 not in out.tokens  # no EOS: the text is exactly the tokens
    assert loglikelihood_of(rt, "greedy?", out.text)[1] is True
    other = rt.tokenizer.decode([(out.tokens[0] % 94) + 1]) + out.text[1:]  # first token changed
    assert loglikelihood_of(rt, "greedy?", other)[1] is False


def test_long_inputs_keep_the_last_max_len_tokens(rt):
    toks = rt.tokenizer.encode("a fairly long context here" + " and more")
    ll, _ = loglikelihood_of(rt, "a fairly long context here", " and more", max_len=12)
    expected = hand_logprobs(rt.model, toks[-13:])[-len(" and more"):].sum().item()
    assert ll == pytest.approx(expected, abs=1e-4)


def test_batched_scoring_equals_one_at_a_time(rt):
    windows = [(rt.tokenizer.encode(t), n) for t, n in (("short one", 3), ("a much longer window of text", 10), ("xy", 1))]
    batched = score_tokens(rt.model, windows)
    for w, (lp, greedy) in zip(windows, batched, strict=True):
        (lp1, greedy1), = score_tokens(rt.model, [w])
        torch.testing.assert_close(lp, lp1, atol=1e-4, rtol=1e-4)
        assert greedy == greedy1


def test_rolling_windows_score_every_token_once():
    toks = list(range(10, 23))  # 13 tokens
    windows = rolling_windows(toks, prefix=0, max_len=5)
    assert [n for _, n in windows] == [5, 5, 3]
    assert all(len(w) - 1 <= 5 for w, _ in windows)
    assert sum((w[-n:] for w, n in windows), []) == toks
    assert rolling_windows(toks, prefix=None, max_len=100) == [(toks, 12)]


def test_rolling_loglikelihood_equals_hand_computation(rt):
    text = "perplexity over windows!"
    toks = [0] + rt.tokenizer.encode(text)
    full = hand_logprobs(rt.model, toks).sum().item()
    assert rolling_loglikelihood(rt, text) == pytest.approx(full, abs=1e-3)
    # windows of 8: each predicts 8 tokens from the one token before them
    by_hand = sum(hand_logprobs(rt.model, toks[s - 1: s + 8]).sum().item() for s in range(1, len(toks), 8))
    assert rolling_loglikelihood(rt, text, max_len=8, batch_size=2) == pytest.approx(by_hand, abs=1e-3)
    assert rolling_loglikelihood(rt, "") == 0.0


def test_generate_until_text_stops_and_equals_runtime(rt):
    full = rt.generate_text("abc", rt.generation_config(max_new_tokens=20, do_sample=False)).text
    assert generate_until_text(rt, "abc", max_gen_toks=20) == full
    stop = full[5:7]
    assert generate_until_text(rt, "abc", until=[stop], max_gen_toks=20) == full[: full.find(stop)]
    assert generate_until_text(rt, "abc", max_gen_toks=20, mode="ar") == full  # lossless
    # a context longer than the model's positions is cut from the left, not an error
    assert isinstance(generate_until_text(rt, "x" * 600, max_gen_toks=8), str)


def test_registered_lm_eval_model(rt):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval==0.4.13)")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model, model_registry

    from tidar.serve.lm_eval import TidarLM

    assert get_model("tidar") is TidarLM
    assert "hf" in model_registry  # registering ours must not hide the harness's own models
    lm = TidarLM.create_from_arg_obj({"runtime": rt, "batch_size": "2"}, {"device": "cpu", "max_batch_size": None})

    reqs = [Instance("loglikelihood", {}, ("Hello", " world"), 0), Instance("loglikelihood", {}, ("abc", "d"), 1),
            Instance("loglikelihood", {}, ("", "xyz"), 2)]
    got = lm.loglikelihood(reqs)
    for r, (ll, greedy) in zip(reqs, got, strict=True):
        exp_ll, exp_greedy = loglikelihood_of(rt, *r.args)
        assert ll == pytest.approx(exp_ll, abs=1e-4) and greedy == exp_greedy

    (ll,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("some text",), 0)])
    assert ll == pytest.approx(rolling_loglikelihood(rt, "some text"), abs=1e-4)

    full = generate_until_text(rt, "abc", max_gen_toks=16)
    stop = full[4:6]
    outs = lm.generate_until([
        Instance("generate_until", {}, ("abc", {"until": [stop], "max_gen_toks": 16, "do_sample": False}), 0),
        Instance("generate_until", {}, ("abc", {"until": "never", "max_gen_toks": 16, "temperature": 0.0}), 1),
    ])
    assert outs == [full[: full.find(stop)], full]
