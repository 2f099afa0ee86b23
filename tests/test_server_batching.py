"""Continuous batching in the server (issue 27, item 1) on the tiny model: requests that arrive while
others decode join the running batch between steps and leave when done; every greedy answer equals
the same prompt decoded alone; the batch never exceeds --max-batch; incompatible requests (other
decoding options, seeded sampling) wait for a batch of their own; a cancelled request leaves the
batch without disturbing the others."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

pytest.importorskip("fastapi", reason="the `serve` extra (fastapi, uvicorn) is not installed")
pytest.importorskip("httpx", reason="fastapi's TestClient needs httpx")

from conftest import tiny_model  # noqa: E402
from test_server import CharTokenizer  # noqa: E402
from test_server_limits import SAFETY_S, asgi_post, async_client, stall, until  # noqa: E402

from tidar.runtime import Runtime  # noqa: E402
from tidar.serve.server import ServerConfig, create_app  # noqa: E402

PROMPTS = ["first prompt", "a second one", "3", "and the fourth, longer than the others", "five", "six?"]


def runtime() -> Runtime:
    return Runtime(tiny_model(seed=11), CharTokenizer(), {"block_size": 3, "max_draft_batch": 2, "lookup_ngram": 2},
                   name="/models/tiny")


def solo(rt: Runtime, prompt: str, n: int) -> str:
    return rt.generate_text(prompt, rt.generation_config(max_new_tokens=n, do_sample=False)).text


class Spy:
    """Counts forwards and records the batch size of each (rows of the input ids)."""

    def __init__(self, model) -> None:  # noqa: ANN001
        self.sizes: list[int] = []
        self.lock = threading.Lock()
        original = model.forward

        def forward(ids, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            with self.lock:
                self.sizes.append(ids.shape[0])
            return original(ids, *args, **kwargs)

        model.forward = forward

    @property
    def calls(self) -> int:
        return len(self.sizes)


def body(prompt: str, n: int, **kw) -> dict:  # noqa: ANN003
    return {"prompt": prompt, "max_tokens": n, "temperature": 0, **kw}


def text_of(response) -> str:  # noqa: ANN001
    return response.json()["choices"][0]["text"]


def test_requests_arriving_mid_decode_join_the_batch_and_answer_as_alone():
    rt = runtime()
    budgets = [40, 25, 33, 18, 30, 12]
    expected = [solo(rt, p, n) for p, n in zip(PROMPTS, budgets, strict=True)]
    app = create_app(rt)
    spy = Spy(rt.model)

    async def go() -> list[str]:
        async with async_client(app) as c:
            tasks = []
            for k, (p, n) in enumerate(zip(PROMPTS, budgets, strict=True)):
                tasks.append(asyncio.create_task(c.post("/v1/completions", json=body(p, n))))
                calls = spy.calls
                if k < len(PROMPTS) - 1:  # the next request arrives a few forwards later
                    await until(lambda calls=calls: spy.calls >= calls + 3, "the batch decoded on")
            texts = [text_of(r) for r in await asyncio.gather(*tasks)]
            await until(lambda: app.state.server.worker.running_batch == 0, "every row left the batch")
            return texts

    assert asyncio.run(go()) == expected
    assert max(spy.sizes) >= 3  # they really shared forwards


def test_the_batch_never_exceeds_max_batch_and_streams_still_match():
    rt = runtime()
    expected = [solo(rt, p, 20) for p in PROMPTS]
    app = create_app(rt, config=ServerConfig(max_batch=2))
    spy = Spy(rt.model)

    async def stream(c, p: str) -> str:  # noqa: ANN001
        out = []
        async with c.stream("POST", "/v1/completions", json=body(p, 20, stream=True)) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    out.append(json.loads(line[6:])["choices"][0]["text"])
        return "".join(out)

    async def go() -> list[str]:
        async with async_client(app) as c:
            return await asyncio.gather(*(stream(c, p) for p in PROMPTS))

    assert asyncio.run(go()) == expected
    assert max(spy.sizes) == 2


def test_other_options_and_seeded_sampling_wait_for_their_own_batch():
    rt = runtime()
    app = create_app(rt)
    spy = Spy(rt.model)
    seeded = body("abc", 15, temperature=0.8, seed=7)

    async def go() -> list:
        async with async_client(app) as c:
            rs = await asyncio.gather(c.post("/v1/completions", json=body(PROMPTS[0], 30)),
                                      c.post("/v1/completions", json=body(PROMPTS[1], 30, mode="ar")),
                                      c.post("/v1/completions", json=seeded),
                                      c.post("/v1/completions", json=seeded))
        return [text_of(r) for r in rs]

    greedy_tidar, greedy_ar, s1, s2 = asyncio.run(go())
    assert greedy_tidar == solo(rt, PROMPTS[0], 30)
    assert greedy_ar == solo(rt, PROMPTS[1], 30)
    assert s1 == s2  # same seed, each decoded alone: the same draws
    assert max(spy.sizes) == 1  # nothing here was compatible with anything else


def test_a_cancelled_request_leaves_the_batch_and_the_others_answer_as_alone():
    rt = runtime()
    expected = solo(rt, PROMPTS[3], 40)
    app = create_app(rt)
    spy = Spy(rt.model)

    async def go() -> tuple[list[dict], str]:
        async with async_client(app) as c:
            gone = asyncio.Event()
            leaving = asyncio.create_task(asgi_post(app, "/v1/completions", body(PROMPTS[0], 200), gone))
            await until(lambda: spy.calls >= 2, "the first request is decoding")
            staying = asyncio.create_task(c.post("/v1/completions", json=body(PROMPTS[3], 40)))
            await until(lambda: 2 in spy.sizes, "the second request joined")
            gone.set()
            await until(lambda: app.state.server.worker.running_batch == 1, "the first request left the batch")
            return await asyncio.wait_for(leaving, SAFETY_S), text_of(await staying)

    sent, text = asyncio.run(go())
    assert text == expected
    assert spy.sizes[-1] == 1 and spy.calls < 200  # the abandoned request stopped decoding
    assert not any(m.get("type") == "http.response.body" and b"choices" in m.get("body", b"") for m in sent)


def test_a_prompt_the_engine_refuses_fails_alone_when_jobs_join_together():
    rt = runtime()
    app = create_app(rt)
    too_long = "x" * 505  # the tiny model has 512 positions

    async def go() -> list:
        async with async_client(app) as c:
            with stall(app) as s:  # hold the first request's prefill, so the next three queue and join together
                first = asyncio.create_task(c.post("/v1/completions", json=body(PROMPTS[0], 20)))
                assert await asyncio.to_thread(s.reached.wait, SAFETY_S)
                rest = [asyncio.create_task(c.post("/v1/completions", json=b))
                        for b in (body(PROMPTS[1], 20), body(too_long, 20), body(PROMPTS[2], 20))]
                await until(lambda: app.state.server.worker.depth == 3, "three requests queued")
                s.release.set()
                return await asyncio.gather(first, *rest)

    a, b, bad, c = asyncio.run(go())
    assert [text_of(a), text_of(b), text_of(c)] == [solo(rt, p, 20) for p in PROMPTS[:3]]
    assert bad.status_code == 400 and "exceeds the model's 512 positions" in bad.json()["error"]["message"]
