"""The official `openai` client against a real uvicorn server on a tiny random model (issue 27): completions
and chat, plain and streamed, equal to what the runtime generates; errors as the client's typed exceptions
(400, 404, 401, 429 with a Retry-After the client honours); API keys."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

openai = pytest.importorskip("openai", reason="the official `openai` client (dev extra) is not installed")
pytest.importorskip("fastapi", reason="the `serve` extra (fastapi, uvicorn) is not installed")
pytest.importorskip("httpx", reason="fastapi's TestClient needs httpx")
uvicorn = pytest.importorskip("uvicorn", reason="the `serve` extra (uvicorn) is not installed")

import httpx  # noqa: E402
from conftest import tiny_model  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from test_server import CharTokenizer, greedy  # noqa: E402
from test_server_limits import SAFETY_S, make_app, stall  # noqa: E402

from tidar.runtime import Runtime, TextResult  # noqa: E402

MODEL = "tiny"  # what the server reports for a runtime named /models/tiny
PROMPT = "Hello there"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
KEY = "sk-test-right"


@contextmanager
def live(app: FastAPI) -> Iterator[str]:
    """`app` on a real uvicorn server on a free port of 127.0.0.1, in a thread; yields the /v1 base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # bound before the server starts: no race for the port
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-test", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + SAFETY_S
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(SAFETY_S)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop"


@contextmanager
def openai_client(base_url: str, api_key: str = "unused", max_retries: int = 0) -> Iterator[openai.OpenAI]:
    # the client insists on some key even for a server without keys; the timeout turns a hang into a failure
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=max_retries, timeout=SAFETY_S)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def reference() -> Runtime:
    """A second runtime on the same seeded weights: the expected outputs never share the served model."""
    return Runtime(tiny_model(), CharTokenizer(), name="/models/tiny")


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with live(make_app()) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[openai.OpenAI]:
    with openai_client(base_url) as c:
        yield c


def expected_completion(reference: Runtime, prompt: str, n: int, **kw) -> TextResult:  # noqa: ANN003
    return reference.generate_text(prompt, greedy(reference, n, **kw))


def expected_chat(reference: Runtime, messages: list[dict], n: int) -> tuple[TextResult, int]:
    ids = reference.tokenizer.apply_chat_template(messages)
    return reference.generate_ids([ids], greedy(reference, n))[0], len(ids)


# -- success paths ---------------------------------------------------------------------------------
def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "tidar"


def test_completion_equals_the_runtime(client, reference):
    expected = expected_completion(reference, PROMPT, 24)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    assert isinstance(r, openai.types.Completion)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].text == expected.text and len(expected.text) > 0
    assert r.choices[0].finish_reason == expected.finish_reason
    n_prompt = len(PROMPT)  # one token per character
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (n_prompt, len(expected.tokens), n_prompt + len(expected.tokens))
    # our extension object reaches the client as an extra field
    assert r.model_extra["tidar"]["mode"] == "tidar" and len(r.model_extra["tidar"]["acceptance_histogram"]) == 4


def test_extension_fields_through_extra_body(client, reference):
    expected = expected_completion(reference, "abc", 20, mode="ar")
    r = client.completions.create(model=MODEL, prompt="abc", max_tokens=20, temperature=0, extra_body={"mode": "ar"})
    assert r.choices[0].text == expected.text
    assert r.model_extra["tidar"]["mode"] == "ar" and r.model_extra["tidar"]["block_size"] == 1


def test_streamed_completion_equals_the_plain_one(client, reference):
    expected = expected_completion(reference, "Stream me", 30)
    plain = client.completions.create(model=MODEL, prompt="Stream me", max_tokens=30, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="Stream me", max_tokens=30, temperature=0, stream=True))
    assert all(isinstance(c, openai.types.Completion) and c.id == chunks[0].id for c in chunks)
    pieces = [c.choices[0].text for c in chunks]
    assert "".join(pieces) == plain.choices[0].text == expected.text
    assert sum(1 for p in pieces if p) > 1  # streamed as the engine commits, not one finished string
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.usage is None for c in chunks)  # usage only when stream_options asks for it


def test_chat_equals_the_runtime(client, reference):
    expected, n_prompt = expected_chat(reference, MESSAGES, 16)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=16, temperature=0)
    assert isinstance(r, openai.types.chat.ChatCompletion)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content == expected.text and len(expected.text) > 0
    assert r.choices[0].finish_reason == expected.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, len(expected.tokens))
    # the older budget name means the same
    again = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    assert again.choices[0].message.content == expected.text


def test_streamed_chat_with_usage(client, reference):
    expected, n_prompt = expected_chat(reference, MESSAGES, 20)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(isinstance(c, openai.types.chat.ChatCompletionChunk) for c in chunks)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    *content, usage = chunks
    assert content[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text == expected.text
    assert sum(1 for c in content if c.choices[0].delta.content) > 1
    assert content[-1].choices[0].finish_reason == expected.finish_reason
    # as OpenAI's: the usage comes last, in a chunk with no choices; every other chunk's usage is null
    assert usage.choices == [] and all(c.usage is None for c in content)
    assert (usage.usage.prompt_tokens, usage.usage.completion_tokens, usage.usage.total_tokens) == \
        (n_prompt, len(expected.tokens), n_prompt + len(expected.tokens))


def test_streamed_chat_without_usage_has_none(client, reference):
    expected, _ = expected_chat(reference, MESSAGES, 12)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, stream=True))
    assert all(c.choices and c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text


# -- errors as the client's typed exceptions -------------------------------------------------------
def assert_api_error(e: openai.APIStatusError, status: int, fragment: str, param: str | None, code: str | None,
                     type_: str = "invalid_request_error") -> None:
    assert e.status_code == status == e.response.status_code
    assert fragment in e.message, e.message
    assert (e.param, e.code, e.type) == (param, code, type_)
    assert "Traceback" not in e.response.text


@pytest.mark.parametrize("kwargs, fragment, param", [
    ({"temperature": -1}, "temperature: Input should be greater than or equal to 0", "temperature"),
    ({"top_p": 1.5}, "top_p: Input should be less than or equal to 1", "top_p"),
    ({"presence_penalty": 0.5}, "presence_penalty is not supported by this server", "presence_penalty"),
    ({"logprobs": 2}, "logprobs is not supported by this server", "logprobs"),
    ({"n": 2}, "n must be 1", "n"),
    ({"max_tokens": 600}, "exceeds the model's 512 positions", None),
    ({"max_tokens": 600, "stream": True}, "exceeds the model's 512 positions", None),  # before the stream starts
    ({"extra_body": {"mode": "fast"}}, "mode must be one of tidar, ar", "mode"),
])
def test_bad_completion_requests_are_a_bad_request_error(client, kwargs, fragment, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**{"model": MODEL, "prompt": "a", "max_tokens": 2, **kwargs})
    if param is None:
        assert info.value.status_code == 400 and fragment in info.value.message, info.value.message
    else:
        assert_api_error(info.value, 400, fragment, param, None)


@pytest.mark.parametrize("kwargs, fragment, param", [
    ({"temperature": -0.5}, "temperature: Input should be greater than or equal to 0", "temperature"),
    ({"response_format": {"type": "json_object"}}, "response_format is not supported by this server", "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools is not supported by this server", "tools"),
    ({"stream_options": {"include_usage": True}}, "stream_options is only allowed when stream is true", "stream_options"),
])
def test_bad_chat_requests_are_a_bad_request_error(client, kwargs, fragment, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**{"model": MODEL, "messages": MESSAGES, "max_tokens": 2, **kwargs})
    assert_api_error(info.value, 400, fragment, param, None)


def test_an_empty_chat_is_a_bad_request_error(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    assert "messages is empty" in info.value.message


@pytest.mark.parametrize("stream", [False, True])
def test_an_unknown_model_is_a_not_found_error(client, stream):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4o", prompt="a", max_tokens=2, stream=stream)
    assert_api_error(info.value, 404, f"The model `gpt-4o` does not exist: this server serves `{MODEL}`", "model",
                     "model_not_found")
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="/models/tiny", messages=MESSAGES, max_tokens=2, stream=stream)
    assert_api_error(info.value, 404, "The model `/models/tiny` does not exist", "model", "model_not_found")


# -- a full queue: 429 with Retry-After ------------------------------------------------------------
def test_a_full_queue_is_a_rate_limit_error_whose_retry_after_the_client_honours(reference):
    app = make_app(max_queue=1)
    worker = app.state.server.worker
    long = {"model": MODEL, "prompt": "abc", "max_tokens": 60, "temperature": 0, "extra_body": {"mode": "ar"}}
    expected = expected_completion(reference, "abc", 60, mode="ar").text
    # stall last in the `with`, so it exits first: the model is released before the pool waits for its threads
    with live(app) as url, openai_client(url) as client, openai_client(url, max_retries=3) as retrying, \
            ThreadPoolExecutor(3) as pool, stall(app) as s:
        running = pool.submit(client.completions.create, **long)
        assert s.reached.wait(SAFETY_S), "the first request never reached the model"
        waiting = pool.submit(client.completions.create, **long)
        deadline = time.monotonic() + SAFETY_S
        while worker.depth < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.01)

        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(**long)
        assert_api_error(info.value, 429, "the server is busy: 1 requests are waiting (--max-queue 1)", None,
                         "rate_limit_exceeded", "rate_limit_error")
        retry_after = info.value.response.headers["retry-after"]
        assert 1 <= int(retry_after) <= 60
        with pytest.raises(openai.RateLimitError):  # streaming is refused the same way, before any chunk
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, stream=True)

        # a client that retries waits Retry-After, by which time the queue has room
        def refused() -> int:
            metrics = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=SAFETY_S).text
            return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                       if line.startswith("tidar_requests_total{") and 'status="429"' in line)

        t0 = time.monotonic()
        retried = pool.submit(retrying.completions.with_raw_response.create, **long)
        while refused() < 3:  # the two above, then the retrying client's first try
            assert time.monotonic() < t0 + SAFETY_S and not retried.done(), "the retrying client was not refused"
            time.sleep(0.01)
        s.release.set()
        raw = retried.result(SAFETY_S)
        elapsed = time.monotonic() - t0
        # more than one retry only if a loaded machine kept the queue full past the first wait
        assert raw.status_code == 200 and raw.retries_taken >= 1
        assert elapsed >= int(retry_after) - 0.05  # it waited as told
        assert raw.parse().choices[0].text == expected
        assert [f.result(SAFETY_S).choices[0].text for f in (running, waiting)] == [expected, expected]


# -- API keys --------------------------------------------------------------------------------------
def test_api_keys(reference):
    expected = expected_completion(reference, "abc", 8).text
    with live(make_app(api_keys=[KEY, "sk-other"])) as url:
        with openai_client(url, api_key="sk-test-wrong") as wrong:
            for call in (lambda: wrong.models.list(),
                         lambda: wrong.completions.create(model=MODEL, prompt="abc", max_tokens=8, temperature=0),
                         lambda: wrong.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, stream=True)):
                with pytest.raises(openai.AuthenticationError) as info:
                    call()
                assert_api_error(info.value, 401, "Incorrect API key provided", None, "invalid_api_key")
                assert info.value.response.headers["www-authenticate"] == "Bearer"
                assert "sk-test-wrong" not in info.value.response.text  # a key is never echoed
        with openai_client(url, api_key=KEY) as right:
            # no Authorization header at all: the client sends none when told to omit it
            with pytest.raises(openai.AuthenticationError) as info:
                right.completions.create(model=MODEL, prompt="abc", max_tokens=8, extra_headers={"Authorization": openai.omit})
            assert_api_error(info.value, 401, "Missing API key", None, "invalid_api_key")
            assert info.value.request.headers.get("authorization") is None
            # the right key: every route answers
            assert [m.id for m in right.models.list().data] == [MODEL]
            r = right.completions.create(model=MODEL, prompt="abc", max_tokens=8, temperature=0)
            assert r.choices[0].text == expected
            streamed = right.completions.create(model=MODEL, prompt="abc", max_tokens=8, temperature=0, stream=True)
            assert "".join(c.choices[0].text for c in streamed) == expected
            # a typed error still reaches an authenticated client as the error it is, not as a 401
            with pytest.raises(openai.NotFoundError):
                right.completions.create(model="gpt-4o", prompt="abc", max_tokens=2)
        with openai_client(url, api_key="sk-other") as other:  # any configured key
            assert other.completions.create(model=MODEL, prompt="abc", max_tokens=8, temperature=0).choices[0].text == expected
