"""Fuzzing the server's request validation (issue 27, item 5) with hypothesis: random JSON bodies for
/v1/completions and /v1/chat/completions (wrong types, huge/negative/non-finite numbers, lone
surrogates, missing and extra fields, nested junk, truncated JSON) on the tiny model. No response
may be a 5xx, every error has OpenAI's body, and a normal request still works after each.

TIDAR_FUZZ_EXAMPLES sets the number of examples over both endpoints (default 300, ~30 s here):
`TIDAR_FUZZ_EXAMPLES=2000 pytest -s tests/test_server_fuzz.py` prints the statuses seen."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest

pytest.importorskip("hypothesis", reason="the fuzz test needs hypothesis (the `dev` extra)")
pytest.importorskip("fastapi", reason="the `serve` extra (fastapi, uvicorn) is not installed")
pytest.importorskip("httpx", reason="fastapi's TestClient needs httpx")

from conftest import tiny_model  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_server import UnicodeStrictTokenizer  # noqa: E402

from tidar.runtime import Runtime  # noqa: E402
from tidar.serve import validation  # noqa: E402
from tidar.serve.server import create_app  # noqa: E402

EXAMPLES = int(os.environ.get("TIDAR_FUZZ_EXAMPLES", "300"))
STATUSES: Counter = Counter()
NORMAL = {"prompt": "ok", "max_tokens": 2, "temperature": 0}

# -- strategies ----------------------------------------------------------------------------------
# text with lone surrogates, NUL, newlines and non-ASCII mixed in (hypothesis' default omits surrogates)
odd_chars = st.sampled_from(["\ud800", "\udfff", "\udc80", "\x00", "\n", "é", "😀", "\u2028", "\ufeff"])
text = st.lists(st.one_of(st.characters(exclude_categories=()), odd_chars), max_size=12).map("".join)
edge_ints = st.sampled_from([0, 1, -1, 2, 96, 97, 511, 512, 2**31, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 10**30])
edge_floats = st.sampled_from([0.0, -0.0, 1.0, 0.5, 2.0, 5e-324, 1e-300, 1e-40, 1e-6, 1e300, float("inf"),
                               float("-inf"), float("nan")])
scalars = st.one_of(st.none(), st.booleans(), st.integers(), edge_ints, st.floats(), edge_floats, text)
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                    max_leaves=12)


def field(*good: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a plausible value, sometimes anything."""
    return st.one_of(*good, junk)


# A token budget past ~8 only slows the run (the tiny model has 512 positions): no 5..511.
small_budget = junk.filter(lambda v: not (type(v) is int and 4 < v < 512))
tokens = st.one_of(st.integers(1, 4), st.integers(max_value=0), st.integers(min_value=512), small_budget)
ids = st.lists(st.one_of(st.integers(-2, 100), edge_ints), max_size=6)
prompt = field(text, st.lists(text, max_size=4), ids, st.lists(ids, max_size=3))
part = st.fixed_dictionaries({"type": field(st.just("text"), st.just("image_url"))}, optional={"text": field(text)})
message = st.fixed_dictionaries(
    {"role": field(st.sampled_from(["user", "system", "assistant", "developer", "tool"]))},
    optional={"content": field(text, st.lists(part, max_size=3)), "name": field(text)})
messages = field(st.lists(message, max_size=4))
SAMPLING = {
    "model": field(st.just("tiny"), text),
    "max_tokens": tokens,
    "max_completion_tokens": tokens,
    "temperature": field(st.floats(), edge_floats, st.integers(-1, 3)),
    "top_p": field(st.floats(), edge_floats),
    "top_k": field(st.integers(-2, 200), edge_ints),
    "seed": field(st.integers(), edge_ints),
    "stop": field(text, st.lists(text, max_size=5)),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({}, optional={"include_usage": field(st.booleans())})),
    "n": field(st.integers(-1, 3), edge_ints),
    "best_of": field(st.integers(-1, 3)),
    "mode": field(st.sampled_from(["tidar", "ar"])),
    "block_size": field(st.integers(-2, 40), edge_ints),
    "user": field(text),
    "logprobs": field(st.booleans(), st.integers(0, 5)),
    "top_logprobs": field(st.integers(0, 5)),
    "echo": field(st.booleans()),
    "logit_bias": field(st.dictionaries(st.integers(0, 100).map(str), st.floats(-100, 100), max_size=3)),
    "presence_penalty": field(st.floats(-2, 2)),
    "frequency_penalty": field(st.floats(-2, 2)),
    "repetition_penalty": field(st.floats(0, 2)),
    "min_p": field(st.floats(0, 1)),
    "response_format": field(st.fixed_dictionaries({"type": field(st.sampled_from(["text", "json_object"]))})),
    "tools": junk,
    "tool_choice": field(st.sampled_from(["none", "auto", "required"])),
}

# Valid requests (most are a 200, so generation and streaming run too): one field at a time turns bad.
plain = st.text(max_size=12)  # hypothesis' default alphabet: no surrogates
GOOD_REQUIRED = {
    "/v1/completions": {"prompt": st.one_of(plain.filter(bool), st.lists(plain.filter(bool), min_size=1, max_size=3),
                                            st.lists(st.integers(0, 96), min_size=1, max_size=6))},
    "/v1/chat/completions": {"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant"]),
         "content": st.one_of(plain, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": plain}),
                                              max_size=2))}), min_size=1, max_size=3)},
}
GOOD = {
    "model": st.just("tiny"), "max_tokens": st.integers(1, 4), "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1), "top_k": st.integers(1, 200), "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": st.one_of(plain, st.lists(plain, max_size=4)), "stream": st.booleans(),
    "mode": st.sampled_from(["tidar", "ar"]), "block_size": st.integers(1, 8), "user": plain, "n": st.just(1),
    "presence_penalty": st.just(0), "logprobs": st.sampled_from([None, False]), "response_format": st.just({"type": "text"}),
}


def bodies(path: str, required: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    valid = st.fixed_dictionaries(GOOD_REQUIRED[path], optional=GOOD)
    names = st.one_of(st.sampled_from(sorted({*required, *SAMPLING})), text)
    mutated = st.tuples(valid, names, junk).map(lambda t: {**t[0], t[1]: t[2]})
    extras = st.dictionaries(text, junk, max_size=3)
    full = st.fixed_dictionaries(required, optional=SAMPLING)
    without = st.fixed_dictionaries({}, optional={**required, **SAMPLING})  # the required field may be missing
    chaos = st.tuples(st.one_of(full, full, without), extras).map(lambda t: {**t[1], **t[0]})
    return st.one_of(valid, mutated, mutated, chaos, junk)  # junk: sometimes not an object at all


ENDPOINTS = {"/v1/completions": bodies("/v1/completions", {"prompt": prompt}),
             "/v1/chat/completions": bodies("/v1/chat/completions", {"messages": messages})}


# -- the test ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client():
    with pytest.MonkeyPatch.context() as mp:  # an unset token budget must not decode ~500 tokens per example
        mp.setattr(validation, "DEFAULT_COMPLETION_TOKENS", 4)
        mp.setattr(validation, "DEFAULT_CHAT_TOKENS", 4)
        app = create_app(Runtime(tiny_model(), UnicodeStrictTokenizer(), name="/models/tiny"))
        # no re-raising: a server error must show up as the status a client would get
        with TestClient(app, raise_server_exceptions=False) as c:
            yield c
    if os.environ.get("TIDAR_FUZZ_EXAMPLES"):
        print(f"\nfuzz statuses over {sum(STATUSES.values())} requests: {dict(sorted(STATUSES.items()))}")


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_no_request_body_is_a_server_error(client, path):
    @settings(max_examples=max(1, EXAMPLES // len(ENDPOINTS)), deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(body=ENDPOINTS[path], truncate=st.integers(0, 15))
    def check(body, truncate):  # noqa: ANN001, ANN202
        content = json.dumps(body).encode()  # NaN/Infinity literals and "\ud800" escapes as Python writes them
        if truncate == 0:  # now and then not even JSON
            content = content[: len(content) // 2]
        r = client.post(path, content=content, headers={"content-type": "application/json"})
        STATUSES[r.status_code] += 1
        assert r.status_code < 500, f"{r.status_code} for {content[:500]!r}: {r.text[:500]}"
        if r.status_code >= 400:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error", r.text
        else:
            assert r.status_code == 200 and '"server_error"' not in r.text, r.text[:500]  # nor one mid-stream
        after = client.post("/v1/completions", json=NORMAL)
        assert after.status_code == 200, after.text

    check()
