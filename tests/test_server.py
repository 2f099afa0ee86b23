"""The OpenAI-compatible server on a tiny random model: outputs equal the runtime's, streaming
concatenates to the full text, stop strings, serialized forwards, clean 400s for bad requests."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

pytest.importorskip("fastapi", reason="the `serve` extra (fastapi, uvicorn) is not installed")
pytest.importorskip("httpx", reason="fastapi's TestClient needs httpx")

import httpx  # noqa: E402
from conftest import tiny_model  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from tidar.runtime import Runtime  # noqa: E402
from tidar.serve.server import create_app  # noqa: E402


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
    assert client.get("/health").json() == {"status": "ok", "model": "tiny"}
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
    assert last["usage"] == full["usage"] and "tokens_per_forward" in last["tidar"]


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
    rt.learn = True
    body = {"prompt": "the cat", "max_tokens": 24, "temperature": 0}
    with TestClient(create_app(rt)) as c:
        first, second = (c.post("/v1/completions", json=body).json() for _ in range(2))
        health = c.get("/health").json()
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    assert second["tidar"]["accepted_drafts"]["datastore"] > first["tidar"]["accepted_drafts"]["datastore"] + 10
    assert health["learned_sequences"] == 2 and health["learned_tokens"] == 2 * first["usage"]["completion_tokens"]
