"""A generation request from the queue to OpenAI's response shapes, JSON or server-sent events.

The request waits on its job's events with its deadline (--request-timeout, from arrival: 504, or
an error event in a stream that already started) and, until its response starts, watches for its
client leaving (the job is cancelled: a waiting one leaves the queue, a running one stops at the
next step). A started stream that loses its client is closed by Starlette, and the generator's
`finally` cancels the job."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from tidar.decode import GenerationConfig, GenerationError
from tidar.runtime import TextResult
from tidar.serve.auth import request_key
from tidar.serve.errors import APIError, error_body
from tidar.serve.schema import SamplingRequest
from tidar.serve.state import ServerState
from tidar.serve.worker import Job, QueueFull, WorkerClosed

log = logging.getLogger(__name__)
Kind = Literal["text_completion", "chat.completion"]
CLIENT_GONE = 499  # nginx's "client closed request": what the metrics count for an abandoned request


@dataclass
class Pending:
    """A submitted job and what its response needs."""

    state: ServerState
    job: Job
    kind: Kind
    head: dict[str, Any]
    deadline: float | None  # time.monotonic() past which the request is answered 504

    async def next_event(self, request: Request | None = None) -> tuple:
        """The job's next event; APIError 504 past the deadline, 499 when `request`'s client left."""
        get = asyncio.ensure_future(self.job.events.get())
        gone = asyncio.ensure_future(_disconnected(request)) if request is not None else None
        timeout = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
        try:
            done, _ = await asyncio.wait({get, *([gone] if gone else [])}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (get, gone):
                if task is not None and not task.done():
                    task.cancel()
        if get in done:
            return get.result()
        if gone is not None and gone in done:
            self.state.worker.cancel(self.job, "disconnect")
            raise APIError("the client closed the connection", CLIENT_GONE, code="client_closed_request")
        self.state.worker.cancel(self.job, "timeout")
        raise timeout_error(self.state)


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is already read: the server's next message)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def timeout_error(state: ServerState) -> APIError:
    return APIError(f"the request took longer than this server's limit of {state.config.request_timeout:g} s "
                    "(--request-timeout)", 504, "server_error", code="timeout")


def submit(state: ServerState, request: Request, prompts: list[list[int]], gen: GenerationConfig,
           stop: list[str], stream: bool, arrived: float) -> Job:
    """Queue the generation (429 with Retry-After when the queue is full)."""
    key = request_key(request.scope)
    job = Job(prompts, gen, stop, stream=stream, store=state.learning.store(key),
              learn=state.learning.enabled and key is not None, arrived=arrived)
    try:
        state.worker.submit(job)
    except QueueFull as e:
        raise APIError(f"the server is busy: {e.depth} requests are waiting (--max-queue {state.worker.max_queue}); "
                       "retry later", 429, "rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": str(e.retry_after)}) from None
    except WorkerClosed as e:
        raise APIError(str(e), 503, "server_error", code="shutting_down") from None
    return job


async def generate_response(state: ServerState, request: Request, kind: Kind, prompts: list[list[int]],
                            gen: GenerationConfig, stop: list[str], req: SamplingRequest,
                            arrived: float) -> JSONResponse | StreamingResponse:
    job = submit(state, request, prompts, gen, stop, bool(req.stream), arrived)
    timeout = state.config.request_timeout
    rid = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex
    pending = Pending(state, job, kind, {"id": rid, "created": int(time.time()), "model": state.name},
                      None if timeout is None else arrived + timeout)
    # Wait for the prefill before sending headers, so that a request the engine rejects (too long
    # for the context, ...) still gets a proper 400 instead of an error inside a 200 stream.
    event = await pending.next_event(request)
    while not req.stream and event[0] == "start":
        event = await pending.next_event(request)
    if event[0] == "error":
        raise event[1]
    if not req.stream:
        results: list[TextResult] = event[1]
        return JSONResponse({**pending.head, "object": kind,
                             "choices": [_choice(kind, i, r.text, r.finish_reason, False) for i, r in enumerate(results)],
                             "usage": _usage(prompts, results), "tidar": _tidar_stats(state, gen, results[0].stats)})
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    body = _sse_events(pending, prompts, gen, event, include_usage)
    return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _usage(prompts: list[list[int]], results: list[TextResult]) -> dict[str, int]:
    p = sum(len(x) for x in prompts)
    c = sum(len(r.tokens) for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def default_block_size(state: ServerState) -> int:
    # what a request without `block_size` decodes with: the operating point's, which may differ
    # from the block size the model was trained with (model.config.block_size)
    return state.runtime.generation_config().block_size or state.runtime.model.config.block_size


def _tidar_stats(state: ServerState, gen: GenerationConfig, stats: dict[str, Any]) -> dict[str, Any]:
    # stats["mode"] is the mode that ran: a batch past the operating point's max_draft_batch decodes as AR
    b = gen.block_size or state.runtime.model.config.block_size
    return {**stats, "block_size": b if stats["mode"] == "tidar" else 1}


def _sse(obj: dict[str, Any] | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def _choice(kind: str, i: int, text: str, finish: str | None, delta: bool) -> dict[str, Any]:
    if kind == "text_completion":
        return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
    if delta:
        return {"index": i, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": finish}
    return {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}


def _stream_error(e: BaseException) -> str:
    if isinstance(e, APIError):  # the deadline passed mid-stream
        return _sse(error_body(e.message, e.type, e.param, e.code))
    log.error("generation failed mid-stream: %s: %s", type(e).__name__, e)
    msg, type_ = (str(e), "invalid_request_error") if isinstance(e, GenerationError) else \
        (f"internal error: {type(e).__name__}: {e}", "server_error")
    return _sse(error_body(msg, type_))


async def _sse_events(p: Pending, prompts: list[list[int]], gen: GenerationConfig, first: tuple,
                      include_usage: bool) -> AsyncIterator[str]:
    """Text as the engine commits it, then a finish chunk per prompt, with `include_usage` a usage
    chunk (empty `choices`) as OpenAI's, and [DONE]; an error (the deadline, the engine) ends the
    stream with an error event instead."""
    chunk = {**p.head, "object": "text_completion" if p.kind == "text_completion" else "chat.completion.chunk"}
    if include_usage:  # as OpenAI's: every chunk says usage null, but the last one after the finish chunks
        chunk["usage"] = None
    try:
        if p.kind == "chat.completion":
            for i in range(len(prompts)):
                yield _sse({**chunk, "choices": [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
        event = first
        while event[0] != "done":
            if event[0] == "text":
                yield _sse({**chunk, "choices": [_choice(p.kind, event[1], event[2], None, True)]})
            elif event[0] == "error":
                yield _stream_error(event[1])
                return
            try:
                event = await p.next_event()
            except APIError as e:
                yield _stream_error(e)
                return
        yield "".join(_sse_tail(p, chunk, prompts, gen, event[1], include_usage))
    finally:
        p.state.worker.cancel(p.job, "disconnect")  # no-op when finished; stops the engine when the client left


def _sse_tail(p: Pending, chunk: dict[str, Any], prompts: list[list[int]], gen: GenerationConfig,
              results: list[TextResult], include_usage: bool) -> list[str]:
    out = []
    for i, r in enumerate(results):
        last = {**chunk, "choices": [_choice(p.kind, i, "", r.finish_reason, True)]}
        if i == len(results) - 1:  # the engine's numbers travel with the last finish chunk
            last["tidar"] = _tidar_stats(p.state, gen, r.stats)
        out.append(_sse(last))
    if include_usage:
        out.append(_sse({**chunk, "choices": [], "usage": _usage(prompts, results)}))
    out.append(_sse("[DONE]"))
    return out
