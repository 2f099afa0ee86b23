"""OpenAI-compatible HTTP server: `tidar serve --model DIR`.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health.
Requests take OpenAI's fields (model, prompt | messages, max_tokens, temperature, top_p, seed, stop,
stream, n=1) plus our extensions `mode` ("tidar" | "ar"), `block_size` and `top_k`; responses have
OpenAI's shapes plus a `tidar` object with the engine's statistics (tokens_per_forward,
acceptance_histogram, tokens_per_s, ...).

Concurrency: the model and its KV cache are not re-entrant, so every generation runs on one
dedicated worker thread and requests queue in arrival order. A list of prompts in one
/v1/completions request is decoded as one batch (as AR past the operating point's
max_draft_batch, where drafting stops paying on a CPU); batching *across* requests (continuous
batching) is future work.

Streaming sends the text of each decoding step as the engine commits it (stop strings are held
back until disambiguated by `TextStreamer`), as `data: {...}` server-sent events ending with
`data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from tidar.decode import GenerationConfig, GenerationError
from tidar.decode.options import option_type, options
from tidar.model.weights import chat_ids
from tidar.runtime import Runtime, TextResult

log = logging.getLogger("tidar.serve.server")

MAX_BATCH = 32  # prompts per /v1/completions request
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 512  # OpenAI's chat default is "up to the context"; clamped to it below

# OpenAI fields we cannot honour: accepted only when unset/falsy, so a client never silently gets
# something other than what it asked for.
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "presence_penalty", "frequency_penalty",
               "tools", "functions")


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, type_: str = "invalid_request_error",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param = message, status, type_, param


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": None}}


def error_response(message: str, status: int = 400, type_: str = "invalid_request_error",
                   param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param), status_code=status)


# -- request bodies ------------------------------------------------------------------------------
def _extension_fields() -> dict[str, Any]:
    """Our request fields beyond OpenAI's own names: the decoding options marked `request` in
    `tidar.decode.options` (validated there, as everywhere: a bad value is a 400 naming it)."""
    return {f.name: (option_type(f.name) | None, Field(None, description=f.metadata["help"]))
            for f in options("request")}


_Extensions = create_model("_Extensions", **_extension_fields())


class _SamplingRequest(_Extensions):
    # OpenAI clients send fields we ignore (user, stream_options, ...): keep them, reject only UNSUPPORTED
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)  # OpenAI default: sampling; 0 = greedy
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1
    best_of: int | None = None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)  # newer OpenAI name for max_tokens


# -- generation on token ids, streaming per committed step ---------------------------------------
class Engine:
    """The runtime plus the single worker thread every model forward runs on."""

    def __init__(self, runtime: Runtime, name: str) -> None:
        self.runtime = runtime
        self.name = name
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tidar-engine")
        self.created = int(time.time())

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else [s for s in stop if s]


def _check_common(req: _SamplingRequest) -> None:
    if req.n != 1:
        raise APIError(f"n must be 1 (got {req.n}): send separate requests, or a list of prompts", param="n")
    if req.best_of not in (None, 1):
        raise APIError("best_of is not supported", param="best_of")
    extra = req.model_extra or {}
    for k in UNSUPPORTED:
        if extra.get(k):
            raise APIError(f"{k} is not supported by this server", param=k)


def _config(engine: Engine, req: _SamplingRequest, max_tokens: int) -> GenerationConfig:
    sampling = req.temperature > 0
    seed = req.seed
    if sampling and seed is None:
        # The engine's unseeded generator starts from torch's fixed default seed: without this
        # every unseeded request would draw the same "random" text.
        seed = secrets.randbits(63)
    extensions = {f.name: getattr(req, f.name) for f in options("request")}
    if not sampling:
        extensions["top_k"] = None  # a sampling option, meaningless for greedy (as temperature and top_p)
    return engine.runtime.generation_config(
        **extensions, max_new_tokens=max_tokens, do_sample=sampling, temperature=req.temperature if sampling else None,
        top_p=req.top_p if sampling else None, seed=seed)


def _max_tokens(engine: Engine, requested: int | None, default: int, prompt_len: int, block: int | None) -> int:
    if requested is not None:
        return requested
    # a default must never be the reason a request fails: clamp it to the room left in the context
    cfg = engine.runtime.model.config
    b = block or engine.runtime.generation_config().block_size or cfg.block_size
    room = cfg.max_position_embeddings - prompt_len - 2 * b - 1
    return max(1, min(default, room))


def _validate_ids(engine: Engine, ids: list[int]) -> list[int]:
    vocab = engine.runtime.model.config.vocab_size
    if not ids:
        raise APIError("the prompt is empty after tokenization", param="prompt")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise APIError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt")
    return ids


def _completion_prompts(engine: Engine, prompt: str | list) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif not prompt:
        raise APIError("prompt is empty", param="prompt")
    elif isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if len(prompts) > MAX_BATCH:
        raise APIError(f"at most {MAX_BATCH} prompts per request, got {len(prompts)}", param="prompt")
    return [_validate_ids(engine, list(p) if isinstance(p, list) else engine.runtime.encode(p)) for p in prompts]


def _chat_prompt(engine: Engine, messages: list[ChatMessage]) -> list[int]:
    tok = engine.runtime.tokenizer
    if not messages:
        raise APIError("messages is empty", param="messages")
    if not getattr(tok, "chat_template", None):
        raise APIError("this model's tokenizer has no chat template: use /v1/completions", param="messages")
    msgs = []
    for m in messages:
        content = m.content
        if isinstance(content, list):  # content parts: only text can reach a text-only model
            if any(p.type != "text" for p in content):
                raise APIError("only text content parts are supported", param="messages")
            content = "".join(p.text or "" for p in content)
        msgs.append({"role": m.role, "content": content or ""})
    try:
        ids = chat_ids(tok, msgs)
    except Exception as e:  # a template that rejects the conversation (roles, order) is the caller's error
        raise APIError(f"the chat template rejected these messages: {e}", param="messages") from None
    return _validate_ids(engine, ids)


# -- responses -----------------------------------------------------------------------------------
def _usage(prompts: list[list[int]], results: list[TextResult]) -> dict[str, int]:
    p = sum(len(x) for x in prompts)
    c = sum(len(r.tokens) for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _default_block_size(runtime: Runtime) -> int:
    # what a request without `block_size` decodes with: the operating point's, which may differ
    # from the block size the model was trained with (model.config.block_size)
    return runtime.generation_config().block_size or runtime.model.config.block_size


def _tidar_stats(gen: GenerationConfig, engine: Engine, stats: dict[str, Any]) -> dict[str, Any]:
    # stats["mode"] is the mode that ran: a batch past the operating point's max_draft_batch decodes as AR
    b = gen.block_size or engine.runtime.model.config.block_size
    return {**stats, "block_size": b if stats["mode"] == "tidar" else 1}


def _sse(obj: dict[str, Any] | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def _choice(kind: str, i: int, text: str, finish: str | None, delta: bool) -> dict[str, Any]:
    if kind == "text_completion":
        return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
    if delta:
        return {"index": i, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": finish}
    return {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}


async def _generate_response(engine: Engine, kind: Literal["text_completion", "chat.completion"],
                             prompts: list[list[int]], gen: GenerationConfig, stop: list[str],
                             stream: bool) -> JSONResponse | StreamingResponse:
    rid = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex
    head = {"id": rid, "created": int(time.time()), "model": engine.name}
    if stream:
        return await _stream(engine, kind, head, prompts, gen, stop)
    results = await engine.run(engine.runtime.generate_ids, prompts, gen, stop)
    return JSONResponse({**head, "object": kind,
                         "choices": [_choice(kind, i, r.text, r.finish_reason, False) for i, r in enumerate(results)],
                         "usage": _usage(prompts, results), "tidar": _tidar_stats(gen, engine, results[0].stats)})


async def _stream(engine: Engine, kind: str, head: dict[str, Any], prompts: list[list[int]], gen: GenerationConfig,
                  stop: list[str]) -> StreamingResponse:
    """Server-sent events: text as the engine commits it, then a finish chunk per prompt and [DONE]."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def put(*event: Any) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody to tell
            cancel.set()

    def work() -> None:
        try:
            put("done", engine.runtime.generate_ids(prompts, gen, stop, on_text=lambda i, t: put("text", i, t),
                                                    on_start=lambda: put("start"), cancel=cancel))
        except Exception as e:  # noqa: BLE001 - handed to the response, which turns it into an error body
            put("error", e)

    engine.pool.submit(work)
    # Wait for the prefill before sending headers, so that a request the engine rejects (too long
    # for the context, ...) still gets a proper 400 instead of an error inside a 200 stream.
    first = await events.get()
    if first[0] == "error":
        cancel.set()
        raise first[1]
    body = _sse_events(engine, kind, head, prompts, gen, first, events, cancel)
    return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _sse_events(engine: Engine, kind: str, head: dict[str, Any], prompts: list[list[int]],
                      gen: GenerationConfig, first: tuple, events: asyncio.Queue,
                      cancel: threading.Event) -> AsyncIterator[str]:
    chunk = {**head, "object": "text_completion" if kind == "text_completion" else "chat.completion.chunk"}
    try:
        if kind == "chat.completion":
            for i in range(len(prompts)):
                yield _sse({**chunk, "choices": [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
        event = first
        while event[0] != "done":
            if event[0] == "text":
                yield _sse({**chunk, "choices": [_choice(kind, event[1], event[2], None, True)]})
            elif event[0] == "error":
                e = event[1]
                log.error("generation failed mid-stream: %s: %s", type(e).__name__, e)
                msg, type_ = (str(e), "invalid_request_error") if isinstance(e, GenerationError) else \
                    (f"internal error: {type(e).__name__}: {e}", "server_error")
                yield _sse(error_body(msg, type_))
                return
            event = await events.get()
        results: list[TextResult] = event[1]
        for i, r in enumerate(results):
            last = {**chunk, "choices": [_choice(kind, i, "", r.finish_reason, True)]}
            if i == len(results) - 1:  # the engine's numbers travel with the final chunk
                last["usage"] = _usage(prompts, results)
                last["tidar"] = _tidar_stats(gen, engine, r.stats)
            yield _sse(last)
        yield _sse("[DONE]")
    finally:
        cancel.set()  # no-op when finished; stops the engine when the client disconnected


# -- the app -------------------------------------------------------------------------------------
def _add_error_handlers(app: FastAPI) -> None:
    """Every error is an OpenAI-style JSON body; a traceback goes to the server log, never to a client."""
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e.message, e.status, e.type, e.param)

    @app.exception_handler(GenerationError)
    async def _generation_error(request: Request, e: GenerationError) -> JSONResponse:
        return error_response(str(e))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        parts, param = [], None
        for err in errs[:3]:
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            if err.get("type") == "json_invalid":
                parts.append(f"invalid JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}")
                continue
            # a union field reports one error per alternative; the field name and first reason suffice
            field = loc[0] if loc else "body"
            param = param or field
            if any(p.startswith(f"{field}:") for p in parts):
                continue
            parts.append(f"{field}: {err.get('msg')}" if loc else str(err.get("msg")))
        return error_response("; ".join(parts) or "invalid request", 400, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(str(e.detail), e.status_code, type_)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")  # the traceback goes to the server log, never to the client
        return error_response(f"internal error: {type(e).__name__}: {e}", 500, "server_error")


def create_app(runtime: Runtime, model_name: str | None = None) -> FastAPI:
    """The ASGI app serving `runtime`; `model_name` is what /v1/models and responses report."""
    name = model_name or (Path(runtime.name).name if runtime.name else "tidar")
    engine = Engine(runtime, name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="tidar", description="OpenAI-compatible TiDAR server", lifespan=lifespan)
    app.state.engine = engine

    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        ds = runtime.datastore
        learned = {"learned_sequences": ds.learned_sequences, "learned_tokens": ds.learned_tokens} if runtime.learn and ds else {}
        return {"status": "ok", "model": engine.name, **learned}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": engine.name, "object": "model", "created": engine.created, "owned_by": "tidar",
            "max_model_len": runtime.model.config.max_position_embeddings,
            "block_size": _default_block_size(runtime)}]}

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest) -> JSONResponse | StreamingResponse:
        _check_common(req)
        prompts = _completion_prompts(engine, req.prompt)
        longest = max(len(p) for p in prompts)
        max_tokens = _max_tokens(engine, req.max_tokens, DEFAULT_COMPLETION_TOKENS, longest, req.block_size)
        gen = _config(engine, req, max_tokens)
        return await _generate_response(engine, "text_completion", prompts, gen, _stop_list(req.stop), req.stream)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatRequest) -> JSONResponse | StreamingResponse:
        _check_common(req)
        ids = _chat_prompt(engine, req.messages)
        requested = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
        max_tokens = _max_tokens(engine, requested, DEFAULT_CHAT_TOKENS, len(ids), req.block_size)
        gen = _config(engine, req, max_tokens)
        return await _generate_response(engine, "chat.completion", [ids], gen, _stop_list(req.stop), req.stream)

    return app

