"""Backpressure and limits (issue 27, item 2) on the tiny model: a full queue is a 429 with
Retry-After, the max_tokens cap, the request timeout (504; an error event mid-stream), a client
that leaves stops its generation between steps, the body size limit (413), tokenization and
detokenization off the event loop.

The worker is held deterministically: `stall` replaces the model's forward by one that blocks at a
chosen forward until the test releases it, or until the server cancels the job running it."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi", reason="the `serve` extra (fastapi, uvicorn) is not installed")
pytest.importorskip("httpx", reason="fastapi's TestClient needs httpx")

import httpx  # noqa: E402
from conftest import tiny_model  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from test_server import CharTokenizer, assert_openai_error  # noqa: E402

from tidar.runtime import Runtime  # noqa: E402
from tidar.serve.server import ServerConfig, create_app  # noqa: E402

SAFETY_S = 10  # a wait that should never run out: the test fails instead of hanging
LONG = {"prompt": "abc", "max_tokens": 60, "temperature": 0, "mode": "ar"}  # 60 forwards on the tiny model


def tiny_runtime(tokenizer: CharTokenizer | None = None) -> Runtime:
    return Runtime(tiny_model(), tokenizer or CharTokenizer(), name="/models/tiny")


def make_app(tokenizer: CharTokenizer | None = None, **config) -> FastAPI:  # noqa: ANN003
    return create_app(tiny_runtime(tokenizer), config=ServerConfig(**config))


@contextmanager
def stall(app: FastAPI, at: int = 1, until: str = "release") -> Iterator[SimpleNamespace]:
    """Forward number `at` sets `reached` and blocks until `release` is set (until="release") or the
    job running it is cancelled (until="cancel"). `calls` counts every forward."""
    state = app.state.server
    model = state.runtime.model
    s = SimpleNamespace(calls=0, reached=threading.Event(), release=threading.Event())
    original = model.forward

    def forward(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        s.calls += 1
        if s.calls == at:
            s.reached.set()
            if until == "cancel":
                assert state.worker.running[0].wait_cancelled(SAFETY_S), "the server never cancelled the job"
            else:
                s.release.wait(SAFETY_S)
        return original(*args, **kwargs)

    model.forward = forward
    try:
        yield s
    finally:
        s.release.set()
        state.worker.wait_idle(SAFETY_S)
        del model.forward


@asynccontextmanager
async def async_client(app: FastAPI):  # noqa: ANN201
    """Concurrent requests in one event loop (TestClient sends one at a time)."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c
    app.state.server.close()


async def until(condition, what: str) -> None:  # noqa: ANN001
    """Wait for a state the server reaches (not for a duration)."""
    for _ in range(SAFETY_S * 100):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never reached: {what}")


async def asgi_post(app: FastAPI, path: str, body: dict, gone: asyncio.Event) -> list[dict]:
    """POST through the raw ASGI interface; the client disconnects when `gone` is set. Returns what
    the app sent (TestClient and httpx cannot disconnect mid-request)."""
    delivered, sent = False, []

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"), (b"host", b"t")],
             "client": ("127.0.0.1", 1), "server": ("t", 80)}
    await app(scope, receive, send)
    return sent


# -- the bounded queue -------------------------------------------------------------------------
def test_a_full_queue_is_a_429_with_retry_after_and_health_answers_while_busy():
    app = make_app(max_queue=1)

    async def go() -> None:
        async with async_client(app) as c:
            with stall(app) as s:
                running = asyncio.create_task(c.post("/v1/completions", json=LONG))
                assert await asyncio.to_thread(s.reached.wait, SAFETY_S)
                waiting = asyncio.create_task(c.post("/v1/completions", json=LONG))
                await until(lambda: app.state.server.worker.depth == 1, "the second request queued")
                refused = await c.post("/v1/completions", json=LONG)
                assert_openai_error(refused, 429, "the server is busy", code="rate_limit_exceeded", type_="rate_limit_error")
                assert int(refused.headers["retry-after"]) >= 1
                # the worker is blocked in a forward: /health and /metrics answer from counters
                health = (await c.get("/health")).json()
                assert health == {"status": "ok", "model": "tiny", "queue_depth": 1, "max_queue": 1,
                                  "saturated": True, "running": 1}
                text = (await c.get("/metrics")).text
                assert "tidar_queue_depth 1.0" in text and "tidar_running_batch_size 1.0" in text
                assert not running.done() and not waiting.done()
                s.release.set()
                assert [r.status_code for r in await asyncio.gather(running, waiting)] == [200, 200]
            health = (await c.get("/health")).json()
            assert health["queue_depth"] == 0 and health["saturated"] is False and health["running"] == 0
            assert 'tidar_requests_total{endpoint="/v1/completions",status="429"} 1.0' in (await c.get("/metrics")).text

    asyncio.run(go())


def test_a_queued_request_whose_client_leaves_frees_its_slot():
    app = make_app(max_queue=1)

    async def go() -> None:
        async with async_client(app) as c:
            with stall(app) as s:
                running = asyncio.create_task(c.post("/v1/completions", json=LONG))
                assert await asyncio.to_thread(s.reached.wait, SAFETY_S)
                gone = asyncio.Event()
                leaving = asyncio.create_task(asgi_post(app, "/v1/completions", LONG, gone))
                await until(lambda: app.state.server.worker.depth == 1, "the second request queued")
                gone.set()
                sent = await leaving
                assert sent[0]["status"] == 499
                assert app.state.server.worker.depth == 0  # out of the queue at once, not when its turn comes
                third = asyncio.create_task(c.post("/v1/completions", json={**LONG, "max_tokens": 2}))
                await until(lambda: app.state.server.worker.depth == 1, "the third request queued")
                s.release.set()
                assert (await running).status_code == 200 and (await third).status_code == 200

    asyncio.run(go())


# -- max_tokens cap ----------------------------------------------------------------------------
def test_max_tokens_limit_caps_requests_and_defaults():
    with TestClient(make_app(max_tokens_limit=8)) as c:
        r = c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 9})
        assert_openai_error(r, 400, "max_tokens 9 exceeds this server's limit of 8 tokens", "max_tokens")
        chat = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}
        r = c.post("/v1/chat/completions", json={**chat, "max_completion_tokens": 100})
        assert_openai_error(r, 400, "limit of 8", "max_completion_tokens")
        ok = c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 8, "temperature": 0}).json()
        assert ok["usage"]["completion_tokens"] == 8
        # an unset budget (chat's default is 512) is clamped to the cap, not refused
        default = c.post("/v1/chat/completions", json=chat)
        assert default.status_code == 200 and default.json()["usage"]["completion_tokens"] <= 8


# -- request timeout ---------------------------------------------------------------------------
def test_a_request_past_its_timeout_is_a_504_and_the_engine_stops():
    app = make_app(request_timeout=0.2)
    with TestClient(app) as c, stall(app, at=2, until="cancel") as s:
        r = c.post("/v1/completions", json=LONG)
        assert_openai_error(r, 504, "longer than this server's limit of 0.2 s", code="timeout", type_="server_error")
        app.state.server.worker.wait_idle(SAFETY_S)
        assert s.calls <= 3 < LONG["max_tokens"]  # stopped at the step after the deadline
        assert 'tidar_cancelled_requests_total{reason="timeout"} 1.0' in c.get("/metrics").text


def test_a_stream_past_its_timeout_ends_with_an_error_event():
    app = make_app(request_timeout=0.2)
    with TestClient(app) as c, stall(app, at=4, until="cancel") as s:
        with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            assert r.status_code == 200  # the headers went out after the prefill
            lines = [line for line in r.iter_lines() if line]
        *chunks, last = [json.loads(line[6:]) for line in lines]
        assert "data: [DONE]" not in lines
        assert chunks and all("choices" in x for x in chunks)
        assert last["error"]["code"] == "timeout" and "--request-timeout" in last["error"]["message"]
        app.state.server.worker.wait_idle(SAFETY_S)
        assert s.calls <= 5 < LONG["max_tokens"]


# -- cancellation ------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path, body", [
    ("/v1/completions", LONG),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "abc"}], "max_tokens": 60, "temperature": 0,
                              "mode": "ar"}),
])
def test_a_client_that_leaves_stops_its_generation(path, body, stream):
    app = make_app()

    async def go() -> tuple[list[dict], int]:
        gone = asyncio.Event()
        with stall(app, at=3, until="cancel") as s:
            async def leave() -> None:
                assert await asyncio.to_thread(s.reached.wait, SAFETY_S)
                gone.set()

            sent, _ = await asyncio.gather(asgi_post(app, path, {**body, "stream": stream}, gone), leave())
        app.state.server.close()
        return sent, s.calls

    sent, calls = asyncio.run(go())
    # a stream had started (200) when its client left; a plain request is answered 499 (for the metrics)
    assert sent[0]["status"] == (200 if stream else 499)
    assert calls <= 4 < body["max_tokens"]  # the engine ran a few steps, not the 60 asked for
    with TestClient(app) as c:
        assert 'tidar_cancelled_requests_total{reason="disconnect"} 1.0' in c.get("/metrics").text


def test_after_shutdown_requests_are_a_503():
    app = make_app()
    with TestClient(app) as c:
        assert c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200
    with TestClient(app) as c:  # the same app after its lifespan ended
        r = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert_openai_error(r, 503, "shutting down", code="shutting_down")


def test_requests_that_finish_are_not_counted_as_cancelled():
    with TestClient(make_app()) as c:
        assert c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200
        with c.stream("POST", "/v1/completions", json={"prompt": "a", "max_tokens": 2, "stream": True}) as r:
            r.read()
        assert "tidar_cancelled_requests_total{" not in c.get("/metrics").text


# -- body size ---------------------------------------------------------------------------------
def test_bodies_over_the_limit_are_a_413_before_parsing():
    with TestClient(make_app(max_body_bytes=2000)) as c:
        big = json.dumps({"prompt": "x" * 2000, "max_tokens": 2}).encode()
        r = c.post("/v1/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.headers["connection"] == "close"
        assert r.json()["error"] == {"message": "the request body is larger than this server's limit of 2000 bytes",
                                     "type": "invalid_request_error", "param": None, "code": "request_too_large"}
        # not JSON at all: still a 413, so nothing parsed it
        assert c.post("/v1/completions", content=b"{" * 3000).status_code == 413

        def chunked(data: bytes, size: int = 500) -> Iterator[bytes]:  # no Content-Length: chunked encoding
            yield from (data[i: i + size] for i in range(0, len(data), size))

        r = c.post("/v1/completions", content=chunked(big), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        small = json.dumps({"prompt": "abc", "max_tokens": 2, "user": "x" * 1500}).encode()
        for content in (small, chunked(small)):  # within the limit: replayed whole to the app
            r = c.post("/v1/completions", content=content, headers={"content-type": "application/json"})
            assert r.status_code == 200, r.text


# -- tokenization and detokenization off the event loop ---------------------------------------
class BlockingTokenizer(CharTokenizer):
    """`encode` (or `decode`) of a text containing "SLOW" blocks until `release` is set."""

    def __init__(self, method: str) -> None:
        self.method, self.entered, self.release, self.finished = method, threading.Event(), threading.Event(), False

    def _block(self) -> None:
        self.entered.set()
        self.release.wait(3)
        self.finished = True

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if self.method == "encode" and "SLOW" in text:
            self._block()
        return super().encode(text)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:  # noqa: ANN001
        if self.method == "decode" and not self.finished and ids:
            self._block()
        return super().decode(ids, skip_special_tokens)


@pytest.mark.parametrize("method", ["encode", "decode"])
def test_health_answers_while_a_prompt_is_tokenized_or_an_answer_detokenized(method):
    tok = BlockingTokenizer(method)
    app = make_app(tok)

    async def go() -> None:
        async with async_client(app) as c:
            post = asyncio.create_task(c.post("/v1/completions", json={"prompt": "SLOW", "max_tokens": 2}))
            assert await asyncio.to_thread(tok.entered.wait, SAFETY_S)
            health = await c.get("/health")
            assert health.status_code == 200 and not tok.finished  # answered while the tokenizer was busy
            tok.release.set()
            assert (await post).status_code == 200

    asyncio.run(go())
