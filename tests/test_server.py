"""The OpenAI-compatible server on a tiny random model: outputs equal the runtime's, streaming
concatenates to the full text, stop strings, serialized forwards, clean 400s for bad requests."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

pytest.importorskip("fastapi", reason="the `serve` extra (fastapi, uvicorn) is not installed")
pytest.importorskip("prometheus_client", reason="the `serve` extra (prometheus-client) is not installed")
pytest.importorskip("httpx", reason="fastapi's TestClient needs httpx")

import httpx  # noqa: E402
from conftest import tiny_model  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from tidar.runtime import Runtime  # noqa: E402
from tidar.serve.server import ServerConfig, create_app  # noqa: E402


class CharTokenizer:
    """97 ids like the tiny model: 0 = EOS, 1..95 = printable ASCII, 96 = newline."""

    eos_token_id = 0
    bos_token_id = None
    chat_template = "<role>content\\n"  # only its truthiness matters to the runtime

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [96 if c == "\n" else ord(c) - 31 if 32 <= ord(c) <= 126 else ord("?") - 31 for c in text]

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:  # noqa: ANN001
        return "".join("\n" if i == 96 else chr(i + 31) for i in ids if i != 0 or not skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = True):  # noqa: ANN001, ANN201
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + ("<assistant>" if add_generation_prompt else "")
        return self.encode(text) if tokenize else text


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime(tiny_model(), CharTokenizer(), name="/models/tiny")


@pytest.fixture(scope="module")
def client(runtime):
    with TestClient(create_app(runtime)) as c:
        yield c


def greedy(runtime: Runtime, n: int, **kw):
    return runtime.generation_config(max_new_tokens=n, do_sample=False, **kw)


def sse_events(client: TestClient, path: str, body: dict) -> list:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_health_and_models(client):
    assert client.get("/health").json() == {"status": "ok", "model": "tiny", "queue_depth": 0, "max_queue": 64,
                                            "saturated": False, "running": 0}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert models["data"][0]["max_model_len"] == 512 and models["data"][0]["block_size"] == 4


def test_models_reports_the_block_size_decoding_uses():
    """The operating point's block size (the shipped model's 3), not the one the model was
    trained with (model.config.block_size, 4 here)."""
    rt = Runtime(tiny_model(), CharTokenizer(), {"block_size": 3}, name="/models/tiny")
    assert rt.model.config.block_size == 4
    with TestClient(create_app(rt)) as c:
        reported = c.get("/v1/models").json()["data"][0]["block_size"]
        used = c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 8, "temperature": 0}).json()
    assert reported == 3 == used["tidar"]["block_size"] == len(used["tidar"]["acceptance_histogram"])


@pytest.mark.parametrize("mode", ["tidar", "ar"])
def test_greedy_completion_equals_runtime(client, runtime, mode):
    expected = runtime.generate_text("Hello there", greedy(runtime, 24, mode=mode))
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello there", "max_tokens": 24,
                                             "temperature": 0, "mode": mode})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == expected.text
    assert body["choices"][0]["finish_reason"] == expected.finish_reason
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": len(expected.tokens),
                             "total_tokens": 11 + len(expected.tokens)}
    stats = body["tidar"]
    assert stats["mode"] == mode and {"tokens_per_forward", "acceptance_histogram", "tokens_per_s"} <= stats.keys()
    if mode == "tidar":
        assert len(stats["acceptance_histogram"]) == 4


def test_tidar_and_ar_agree_and_block_size_is_honoured(client):
    texts = {}
    for mode, b in (("ar", None), ("tidar", 2), ("tidar", 4)):
        body = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 20, "temperature": 0,
                                                    "mode": mode, "block_size": b}).json()
        texts[(mode, b)] = body["choices"][0]["text"]
        if mode == "tidar":
            assert body["tidar"]["block_size"] == b and len(body["tidar"]["acceptance_histogram"]) == b
    assert len(set(texts.values())) == 1  # lossless: greedy TiDAR == greedy AR


def test_prompt_list_is_one_batch(client, runtime):
    prompts = ["one", "a longer prompt"]
    expected = runtime.generate_batch(prompts, greedy(runtime, 12))
    body = client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 12, "temperature": 0}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["text"] for c in body["choices"]] == [e.text for e in expected]


def test_a_prompt_list_past_max_draft_batch_is_decoded_as_ar_and_says_so():
    rt = Runtime(tiny_model(), CharTokenizer(), {"block_size": 3, "max_draft_batch": 1}, name="/models/tiny")
    prompts = ["one", "a longer prompt"]
    expected = [rt.generate_text(p, greedy(rt, 12, mode="ar")).text for p in prompts]
    with TestClient(create_app(rt)) as c:
        both = c.post("/v1/completions", json={"prompt": prompts, "max_tokens": 12, "temperature": 0}).json()
        one = c.post("/v1/completions", json={"prompt": prompts[0], "max_tokens": 12, "temperature": 0}).json()
    assert [x["text"] for x in both["choices"]] == expected
    assert both["tidar"]["mode"] == "ar" and both["tidar"]["block_size"] == 1
    assert one["choices"][0]["text"] == expected[0]
    assert one["tidar"]["mode"] == "tidar" and one["tidar"]["block_size"] == 3


def test_token_id_prompt(client, runtime):
    ids = runtime.encode("Hello")
    a = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 8, "temperature": 0}).json()
    b = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 8, "temperature": 0}).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_chat_uses_the_template_of_all_messages(client, runtime):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    msg = body["choices"][0]["message"]
    ids = runtime.tokenizer.apply_chat_template(messages)
    expected = runtime.generate_ids([ids], greedy(runtime, 16))[0]
    assert msg == {"role": "assistant", "content": expected.text}
    assert body["usage"]["prompt_tokens"] == len(ids)
    # content parts (text only) mean the same as a plain string
    parts = [{"role": "system", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
             {"role": "user", "content": "hi"}]
    again = client.post("/v1/chat/completions", json={"messages": parts, "max_tokens": 16, "temperature": 0}).json()
    assert again["choices"][0]["message"]["content"] == expected.text


def test_streamed_completion_concatenates_to_the_full_text(client):
    req = {"prompt": "Stream me", "max_tokens": 30, "temperature": 0}
    full = client.post("/v1/completions", json=req).json()
    events = sse_events(client, "/v1/completions", {**req, "stream": True})
    pieces = [e["choices"][0]["text"] for e in events]
    assert "".join(pieces) == full["choices"][0]["text"]
    assert sum(1 for p in pieces if p) > 1  # sent as the engine commits, not as one finished string
    assert all(e["object"] == "text_completion" and e["id"] == events[0]["id"] for e in events)
    last = events[-1]
    assert last["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert "tokens_per_forward" in last["tidar"]
    assert not any("usage" in e for e in events)  # as OpenAI's: usage only with stream_options.include_usage


def test_streamed_chat(client):
    req = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 20, "temperature": 0}
    full = client.post("/v1/chat/completions", json=req).json()
    events = sse_events(client, "/v1/chat/completions", {**req, "stream": True})
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == full["choices"][0]["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_strings(client):
    base = client.post("/v1/completions", json={"prompt": "xyz", "max_tokens": 30, "temperature": 0}).json()
    text = base["choices"][0]["text"]
    assert len(text) >= 10
    stop = text[6:8]
    cut = text[: text.find(stop)]
    for stop_arg in (stop, [stop, "never-appears"]):
        req = {"prompt": "xyz", "max_tokens": 30, "temperature": 0, "stop": stop_arg}
        body = client.post("/v1/completions", json=req).json()
        assert body["choices"][0]["text"] == cut and body["choices"][0]["finish_reason"] == "stop"
        streamed = sse_events(client, "/v1/completions", {**req, "stream": True})
        assert "".join(e["choices"][0]["text"] for e in streamed) == cut


def test_sampling_seed(client):
    req = {"prompt": "abc", "max_tokens": 16, "temperature": 1.5, "top_p": 0.95}
    a, b = (client.post("/v1/completions", json={**req, "seed": 7}).json()["choices"][0]["text"] for _ in range(2))
    assert a == b
    unseeded = {client.post("/v1/completions", json=req).json()["choices"][0]["text"] for _ in range(3)}
    assert len(unseeded) > 1  # an unseeded request is really random


@pytest.mark.parametrize("path, body, fragment", [
    ("/v1/completions", {"max_tokens": 4}, "prompt: Field required"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "mode": "fast"}, "mode must be one of tidar, ar"),
    ("/v1/completions", {"prompt": "a", "n": 2}, "n must be 1"),
    ("/v1/completions", {"prompt": "a", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "a", "block_size": 1000}, "block_size"),
    ("/v1/completions", {"prompt": "a", "logprobs": 3}, "logprobs is not supported"),
    ("/v1/completions", {"prompt": ""}, "empty"),
    ("/v1/completions", {"prompt": []}, "empty"),
    ("/v1/completions", {"prompt": [5, 1000]}, "outside the vocabulary"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 600}, "exceeds the model's 512 positions"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 600, "stream": True}, "exceeds the model's 512 positions"),
    ("/v1/chat/completions", {"max_tokens": 4}, "messages: Field required"),
    ("/v1/chat/completions", {"messages": []}, "messages is empty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text"),
])
def test_bad_requests_get_400_with_an_openai_error(client, path, body, fragment):
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"] == "invalid_request_error"
    assert "Traceback" not in r.text


def test_invalid_json_and_unknown_route(client):
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "invalid JSON" in r.json()["error"]["message"]
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_chat_without_template_is_a_400():
    tok = CharTokenizer()
    tok.chat_template = None
    with TestClient(create_app(Runtime(tiny_model(), tok))) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]


def test_concurrent_requests_never_overlap_forwards(runtime):
    model = runtime.model
    active, overlaps, lock = [0], [0], threading.Lock()
    original = model.forward

    def guarded(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        with lock:
            active[0] += 1
            overlaps[0] += active[0] > 1
        try:
            return original(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    model.forward = guarded
    try:
        async def go() -> list[str]:
            transport = httpx.ASGITransport(app=create_app(runtime))
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                rs = await asyncio.gather(*(c.post("/v1/completions", json={"prompt": p, "max_tokens": 12, "temperature": 0})
                                            for p in ("first", "second", "third")))
            return [r.json()["choices"][0]["text"] for r in rs]

        texts = asyncio.run(go())
    finally:
        del model.forward
    assert overlaps[0] == 0
    assert texts == [runtime.generate_text(p, greedy(runtime, 12)).text for p in ("first", "second", "third")]


def test_learning_server_drafts_a_repeated_request_from_its_earlier_answer():
    from tidar.decode import Datastore

    rt = Runtime(tiny_model(), CharTokenizer(), {"block_size": 3, "datastore_tokens": 8}, name="/models/tiny",
                 datastore=Datastore([[1, 2, 3]], vocab_size=97))
    body = {"prompt": "the cat", "max_tokens": 24, "temperature": 0}
    auth = {"Authorization": "Bearer k"}
    with TestClient(create_app(rt, config=ServerConfig(api_keys=["k"], learn=True))) as c:
        first, second = (c.post("/v1/completions", json=body, headers=auth).json() for _ in range(2))
        health = c.get("/health", headers=auth).json()
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    assert second["tidar"]["accepted_drafts"]["datastore"] > first["tidar"]["accepted_drafts"]["datastore"] + 10
    assert health["learned_sequences"] == 2 and health["learned_tokens"] == 2 * first["usage"]["completion_tokens"]
    assert rt.datastore.learned_sequences == 0  # the model's own store learned nothing: the key's fork did


# -- strict validation (issue 27, item 5): every bad input is a 4xx with OpenAI's error body ---------
class UnicodeStrictTokenizer(CharTokenizer):
    """Fails on a lone surrogate as Hugging Face's (Rust) tokenizers do ("TextInputSequence must be str")."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        text.encode("utf-8")  # UnicodeEncodeError on "\ud800"
        return super().encode(text)


def post_raw(client: TestClient, path: str, body) -> httpx.Response:  # noqa: ANN001
    """`body` as Python's json writes it: NaN/Infinity literals, "\\ud800" escapes (httpx's json= refuses both)."""
    return client.post(path, content=body if isinstance(body, bytes) else json.dumps(body).encode(),
                       headers={"content-type": "application/json"})


def assert_openai_error(r: httpx.Response, status: int, fragment: str, param: str | None = None,
                        code: str | None = None, type_: str | None = None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert fragment in err["message"], err["message"]
    assert err["type"] == (type_ or ("server_error" if status >= 500 else "invalid_request_error"))
    if param is not None:
        assert err["param"] == param
    assert err["code"] == code
    assert "Traceback" not in r.text


@pytest.fixture(scope="module")
def strict_client():
    with TestClient(create_app(Runtime(tiny_model(), UnicodeStrictTokenizer(), name="/models/tiny")),
                    raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("path, body, fragment, param", [
    ("/v1/completions", {"prompt": "a\ud800b"}, "prompt is not valid Unicode", "prompt"),
    ("/v1/completions", {"prompt": ["ok", "\udfff"]}, "prompt[1] is not valid Unicode", "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]},
     "messages[0].content is not valid Unicode", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     "messages[0].content[0].text is not valid Unicode", "messages"),
    ("/v1/completions", {"prompt": "a", "stop": ["\ud800"]}, "stop[0] is not valid Unicode", "stop"),
    ("/v1/completions", {"prompt": "a", "user": "\ud800"}, "user is not valid Unicode", "user"),
    ("/v1/completions", {"prompt": "a", "\ud800": 1}, "a key contains a lone surrogate", None),
])
def test_lone_surrogates_are_a_400_not_a_500(strict_client, path, body, fragment, param):
    """A JSON "\\ud800" escape parses to a str no tokenizer can encode: it was a 500 (TypeError in the
    Rust tokenizer), now a 400 saying the text is not valid Unicode."""
    assert_openai_error(post_raw(strict_client, path, {**body, "max_tokens": 2}), 400, fragment, param)


def test_utf8_encoded_surrogates_are_a_400(strict_client):
    # raw bytes ED A0 80: Python's json reads them (surrogatepass) into the same lone surrogate
    assert_openai_error(post_raw(strict_client, "/v1/completions", b'{"prompt": "\xed\xa0\x80", "max_tokens": 2}'),
                        400, "not valid Unicode", "prompt")


@pytest.mark.parametrize("body, fragment, param", [
    # seeds past int64: "Overflow when unpacking long long" in torch's manual_seed once; now the field's bound
    ({"seed": 2**63}, "seed: Input should be less than or equal to 9223372036854775807", "seed"),
    ({"seed": -(2**63) - 1}, "seed: Input should be greater than or equal to", "seed"),
    ({"seed": 10**30}, "seed", "seed"),
    # non-finite numbers (JSON NaN / Infinity; 1e400 parses as inf), wherever they are
    ({"temperature": float("inf")}, "temperature must be a finite number, got inf", "temperature"),
    ({"temperature": float("nan")}, "temperature must be a finite number, got nan", "temperature"),
    ({"top_p": float("nan")}, "top_p must be a finite number", "top_p"),
    ({"max_tokens": float("inf")}, "max_tokens must be a finite number", "max_tokens"),
    ({"presence_penalty": float("nan")}, "presence_penalty must be a finite number", "presence_penalty"),
    ({"metadata": {"a": [1, float("-inf")]}}, "metadata.a[1] must be a finite number, got -inf", "metadata"),
    # wrong types: no coercion of "5", true or 2.0
    ({"temperature": True}, "temperature: Input should be a valid number", "temperature"),
    ({"max_tokens": "5"}, "max_tokens: Input should be a valid integer", "max_tokens"),
    ({"max_tokens": 2.0}, "max_tokens: Input should be a valid integer", "max_tokens"),
    ({"stream": "yes"}, "stream: Input should be a valid boolean", "stream"),
    ({"n": True}, "n: Input should be a valid integer", "n"),
    ({"seed": 1.5}, "seed: Input should be a valid integer", "seed"),
    ({"stop": 5}, "stop:", "stop"),
    ({"prompt": [True, False]}, "prompt:", "prompt"),
    ({"block_size": "4"}, "block_size: Input should be a valid integer", "block_size"),
    ({"mode": 1}, "mode: Input should be a valid string", "mode"),
    # ranges; an option greedy decoding then ignores is still checked
    ({"top_p": 1.5}, "top_p: Input should be less than or equal to 1", "top_p"),
    ({"top_p": -0.1}, "top_p: Input should be greater than or equal to 0", "top_p"),
    ({"top_k": 0, "temperature": 0}, "top_k must be >= 1", "top_k"),
    ({"block_size": 1000}, "block_size must be <= 32", "block_size"),
    ({"mode": "fast"}, "mode must be one of tidar, ar", "mode"),
    ({"stream_options": {"include_usage": True}}, "stream_options is only allowed when stream is true",
     "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options:", "stream_options"),
])
def test_bad_values_are_a_400_naming_the_field(client, body, fragment, param):
    assert_openai_error(post_raw(client, "/v1/completions", {"prompt": "a", "max_tokens": 2, **body}), 400,
                        fragment, param)


@pytest.mark.parametrize("body, fragment", [
    ({"messages": "hi"}, "messages: Input should be a valid list"),
    ({"messages": [{"role": 1, "content": "hi"}]}, "messages: Input should be a valid string"),
    ({"messages": [{"role": "user"}]}, "messages[0].content is required for role 'user'"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content is required"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "a text part needs `text`"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, "max_completion_tokens"),
])
def test_bad_chat_messages_are_a_400(client, body, fragment):
    assert_openai_error(post_raw(client, "/v1/chat/completions", {"max_tokens": 2, **body}), 400, fragment)


@pytest.mark.parametrize("field, value", [
    ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
    ("repetition_penalty", 1.2),
    ("min_p", 0.05),
    ("logit_bias", {"5": 10}),
    ("logprobs", 2),
    ("top_logprobs", 3),
    ("presence_penalty", 0.5),
    ("frequency_penalty", -1),
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("functions", [{"name": "f"}]),
    ("tool_choice", "required"),
    ("echo", True),
    ("suffix", "end"),
    ("min_tokens", 5),
    ("ignore_eos", True),
])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_unsupported_fields_are_rejected_by_name(client, path, field, value):
    """Once silently ignored (response_format, repetition_penalty, min_p): a client asked for something
    the server would not do."""
    base = {"prompt": "a"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "a"}]}
    r = post_raw(client, path, {**base, "max_tokens": 2, field: value})
    assert_openai_error(r, 400, f"{field} is not supported by this server", field)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_fields_clients_send_by_default_with_neutral_values_still_work(client, path):
    base = {"prompt": "a"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "a"}]}
    neutral = {"model": "tiny", "n": 1, "stream": False, "stream_options": None, "presence_penalty": 0,
               "frequency_penalty": 0.0, "user": "someone", "logprobs": None, "top_logprobs": 0, "echo": False,
               "logit_bias": {}, "response_format": {"type": "text"}, "repetition_penalty": 1.0, "min_p": 0,
               "tools": [], "tool_choice": "none", "parallel_tool_calls": True, "temperature": None, "top_p": None,
               "seed": None, "stop": None, "best_of": 1, "store": False, "metadata": {"k": "v"}, "top_k": None}
    r = post_raw(client, path, {**base, **neutral, "max_tokens": 2})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path, base", [("/v1/completions", {"prompt": "a"}),
                                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]})])
def test_model_names_other_than_the_served_one_are_a_404(client, path, base):
    served = client.get("/v1/models").json()["data"][0]["id"]
    for name in ("gpt-4o", "", "TINY", "/models/tiny"):
        r = post_raw(client, path, {**base, "model": name, "max_tokens": 2})
        assert_openai_error(r, 404, f"The model `{name}` does not exist", "model", code="model_not_found")
    for ok in ({"model": served}, {}):  # the name /v1/models reports, or none
        assert post_raw(client, path, {**base, **ok, "max_tokens": 2}).status_code == 200


def test_served_model_name_is_the_one_accepted(runtime):
    with TestClient(create_app(runtime, "my-model")) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == "my-model"
        assert c.post("/v1/completions", json={"model": "my-model", "prompt": "a", "max_tokens": 2}).status_code == 200
        assert c.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2}).status_code == 404


@pytest.mark.parametrize("sampling", [{"top_p": 0, "temperature": 1.5}, {"top_p": 0}, {"top_p": 1e-300},
                                      {"temperature": 0}, {"temperature": 1e-6}, {"temperature": 1e-40},
                                      {"temperature": 5e-324}])
def test_top_p_zero_and_tiny_temperatures_are_greedy(client, runtime, sampling):
    """top_p 0 was a 400 (OpenAI accepts 0..1); a temperature or top_p so small that the engine's
    float32 warp overflows (1e-40, 5e-324) or rounds to 0 (1e-300) was a 500 (NaN probabilities)."""
    expected = runtime.generate_text("abc", greedy(runtime, 12)).text
    for seed in (1, 2):
        r = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 12, "seed": seed, **sampling})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected


@pytest.mark.parametrize("path, base, key", [
    ("/v1/completions", {"prompt": "Stream me"}, "text"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}]}, "content"),
])
def test_stream_include_usage_sends_a_final_usage_chunk_as_openai(client, path, base, key):
    req = {**base, "max_tokens": 12, "temperature": 0}
    full = client.post(path, json=req).json()
    events = sse_events(client, path, {**req, "stream": True, "stream_options": {"include_usage": True}})
    *chunks, usage = events
    assert usage["choices"] == [] and usage["usage"] == full["usage"]
    assert usage["id"] == chunks[0]["id"] and usage["object"] == chunks[0]["object"]
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in chunks)  # null on every other chunk
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert "tokens_per_forward" in chunks[-1]["tidar"]
    # include_usage false: OpenAI's plain layout, no usage anywhere
    plain = sse_events(client, path, {**req, "stream": True, "stream_options": {"include_usage": False}})
    assert all("usage" not in e and e["choices"] for e in plain)


@pytest.mark.parametrize("stream", [False, True])
def test_unexpected_errors_are_a_500_in_openai_shape_with_connection_close(caplog, monkeypatch, stream):
    """Starlette's handler for Exception re-raises after answering, and uvicorn then dropped the
    keep-alive connection without `Connection: close`: the client's next request hit a reset."""
    rt = Runtime(tiny_model(), CharTokenizer(), name="/models/tiny")

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("the engine broke")

    with TestClient(create_app(rt), raise_server_exceptions=False) as c, caplog.at_level("ERROR", "tidar.serve"):
        monkeypatch.setattr(rt.model, "forward", broken)
        r = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "temperature": 0, "stream": stream})
        assert_openai_error(r, 500, "internal error: RuntimeError: the engine broke")
        assert r.headers["connection"] == "close"
        assert "Traceback" in caplog.text and "the engine broke" in caplog.text  # the server log has it
        monkeypatch.undo()
        assert c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200
