"""OpenAI-compatible HTTP server: `tidar serve --model DIR`.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health.
Requests take OpenAI's fields (model, prompt | messages, max_tokens, temperature, top_p, seed, stop,
stream, stream_options, n=1) plus our extensions `mode` ("tidar" | "ar"), `block_size` and `top_k`;
responses have OpenAI's shapes plus a `tidar` object with the engine's statistics
(tokens_per_forward, acceptance_histogram, tokens_per_s, ...).

Validation is strict: every bad request is a 4xx with OpenAI's error body, never a 500 (wrong
types, non-finite numbers, lone surrogates, a `model` other than the one served: 404
model_not_found). A field the server does not implement (response_format, repetition_penalty,
min_p, logit_bias, tools, ...) is a 400 naming it unless its value means "off", so a client never
silently gets something other than what it asked for. Greedy: temperature 0 or top_p 0 (or
below GREEDY_TEMPERATURE / GREEDY_TOP_P). An unexpected failure is a 500 in the same shape, sent with
`Connection: close` (the traceback goes to the server log).

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
import math
import re
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
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tidar.decode import GenerationConfig, GenerationError
from tidar.decode.options import MIN_TEMPERATURE, check_option, option_type, options
from tidar.model.weights import chat_ids
from tidar.runtime import Runtime, TextResult

log = logging.getLogger("tidar.serve.server")

MAX_BATCH = 32  # prompts per /v1/completions request
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 512  # OpenAI's chat default is "up to the context"; clamped to it below

# Below the engine's MIN_TEMPERATURE (vLLM's rule) a request is decoded greedily rather than refused.
GREEDY_TEMPERATURE = MIN_TEMPERATURE
# Below this top_p the nucleus is the most likely token alone (its probability is at least 1/vocab),
# which is greedy decoding; the engine's float32 warp would round a tiny top_p to 0 and drop every token.
GREEDY_TOP_P = 1e-6


def _off(v: Any) -> bool:
    return v is None or v is False or v == 0 or v == "" or v == [] or v == {}


def _number(neutral: float) -> Callable[[Any], bool]:
    return lambda v: v is None or (type(v) in (int, float) and v == neutral)


# Request fields (OpenAI's, and vLLM's/transformers' sampling names) this server does not implement,
# each with the test for the value(s) that mean "off": such a value is accepted (clients send some by
# default, e.g. presence_penalty 0), any other is a 400 naming the field.
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "logprobs": _off, "top_logprobs": _off, "echo": _off, "suffix": _off, "logit_bias": _off,
    "presence_penalty": _number(0), "frequency_penalty": _number(0), "repetition_penalty": _number(1),
    "min_p": _number(0), "typical_p": _number(1), "top_a": _number(0), "min_tokens": _number(0),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "tools": _off, "functions": _off, "tool_choice": lambda v: v in (None, "none", "auto"),
    "function_call": lambda v: v in (None, "none", "auto"),
    "modalities": lambda v: v in (None, ["text"]), "audio": _off,
    "ignore_eos": _off, "stop_token_ids": _off, "bad_words": _off, "allowed_token_ids": _off,
    "use_beam_search": _off, "guided_json": _off, "guided_regex": _off, "guided_choice": _off,
    "guided_grammar": _off, "structured_outputs": _off, "logits_processors": _off, "prompt_logprobs": _off,
    "include_stop_str_in_output": _off,
}
_SURROGATE = re.compile("[\ud800-\udfff]")


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type_, param, code


def _printable(text: str | None) -> str | None:
    # a lone surrogate from the request cannot be encoded as UTF-8: echoing one would fail the response
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": _printable(message), "type": type_, "param": _printable(param), "code": code}}


def error_response(message: str, status: int = 400, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


# -- request bodies ------------------------------------------------------------------------------
def _extension_fields() -> dict[str, Any]:
    """Our request fields beyond OpenAI's own names: the decoding options marked `request` in
    `tidar.decode.options` (validated there, as everywhere: a bad value is a 400 naming it)."""
    return {f.name: (option_type(f.name) | None, Field(None, description=f.metadata["help"]))
            for f in options("request")}


_Extensions = create_model("_Extensions", **_extension_fields())


def _check_json(data: Any) -> None:
    """Reject what JSON lets through but no field can mean: a lone surrogate in any string or key (a
    "\\ud800" escape is not Unicode text, and a tokenizer fails on it) and a non-finite number anywhere
    (Python's JSON parser reads NaN, Infinity and 1e400 as inf). Iterative: JSON nested ~1000 deep
    must not overflow the stack."""
    if not isinstance(data, dict):
        return  # not an object: the model's own validation says so
    stack: list[tuple[str | None, str, Any]] = [(None, "", data)]
    while stack:
        top, path, v = stack.pop()
        if isinstance(v, str) and (bad := _SURROGATE.search(v)):
            raise APIError(f"{path} is not valid Unicode: it contains a lone surrogate (\\u{ord(bad.group()):04x}); "
                           "send UTF-8 text", param=top)
        if isinstance(v, float) and not math.isfinite(v):
            raise APIError(f"{path} must be a finite number, got {v}", param=top)
        if isinstance(v, dict):
            for k, x in v.items():
                if _SURROGATE.search(k):
                    raise APIError(f"{path or 'the request'} is not valid Unicode: a key contains a lone surrogate; "
                                   "send UTF-8 text", param=top)
                stack.append((top or k, f"{path}.{k}" if path else k, x))
        elif isinstance(v, list):
            stack.extend((top, f"{path}[{i}]", x) for i, x in enumerate(v))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool | None = None


class _SamplingRequest(_Extensions):
    # strict: a wrong JSON type is a 400 (no "5" for 5, no true for 1.0; an int is a valid float).
    # Fields beyond these are kept (clients send user, store, metadata, ...); UNSUPPORTED ones must be "off".
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer OpenAI name for max_tokens
    temperature: float | None = Field(None, ge=0)  # OpenAI default 1: sampling; 0 = greedy
    top_p: float | None = Field(None, ge=0, le=1)  # 0 = greedy
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    best_of: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_json(cls, data: Any) -> Any:
        _check_json(data)
        return data


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(_SamplingRequest):
    messages: list[ChatMessage]


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


def _check_common(engine: Engine, req: _SamplingRequest) -> None:
    if req.model is not None and req.model != engine.name:
        raise APIError(f"The model `{req.model}` does not exist: this server serves `{engine.name}` (GET /v1/models)",
                       404, param="model", code="model_not_found")
    extra = req.model_extra or {}
    for k, off in UNSUPPORTED.items():
        if k in extra and not off(extra[k]):
            raise APIError(f"{k} is not supported by this server", param=k)
    if req.n not in (None, 1):
        raise APIError(f"n must be 1 (got {req.n}): send separate requests, or a list of prompts", param="n")
    if req.best_of not in (None, 1):
        raise APIError("best_of is not supported", param="best_of")
    if req.stream_options is not None and not req.stream:
        raise APIError("stream_options is only allowed when stream is true", param="stream_options")
    for f in options("request"):  # validated whether or not greedy decoding then ignores them (top_k)
        value = getattr(req, f.name)
        if value is not None:
            try:
                check_option(f.name, value)
            except GenerationError as e:
                raise APIError(str(e), param=f.name) from None


def _config(engine: Engine, req: _SamplingRequest, max_tokens: int) -> GenerationConfig:
    temperature = 1.0 if req.temperature is None else req.temperature
    sampling = temperature >= GREEDY_TEMPERATURE and (req.top_p is None or req.top_p >= GREEDY_TOP_P)
    seed = req.seed
    if sampling and seed is None:
        # The engine's unseeded generator starts from torch's fixed default seed: without this
        # every unseeded request would draw the same "random" text.
        seed = secrets.randbits(63)
    extensions = {f.name: getattr(req, f.name) for f in options("request")}
    if not sampling:
        extensions["top_k"] = None  # a sampling option, meaningless for greedy (as temperature and top_p)
    return engine.runtime.generation_config(
        **extensions, max_new_tokens=max_tokens, do_sample=sampling, temperature=temperature if sampling else None,
        top_p=req.top_p if sampling else None, seed=seed)


def _requested_tokens(req: _SamplingRequest) -> int | None:
    return req.max_tokens if req.max_tokens is not None else req.max_completion_tokens


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
    return [_validate_ids(engine, list(p) if isinstance(p, list) else engine.runtime.encode(p) if p else []) for p in prompts]


def _chat_prompt(engine: Engine, messages: list[ChatMessage]) -> list[int]:
    tok = engine.runtime.tokenizer
    if not messages:
        raise APIError("messages is empty", param="messages")
    if not getattr(tok, "chat_template", None):
        raise APIError("this model's tokenizer has no chat template: use /v1/completions", param="messages")
    msgs = []
    for i, m in enumerate(messages):
        content = m.content
        if content is None and m.role != "assistant":  # as OpenAI: only an assistant turn may lack content
            raise APIError(f"messages[{i}].content is required for role {m.role!r}", param="messages")
        if isinstance(content, list):  # content parts: only text can reach a text-only model
            if any(p.type != "text" for p in content):
                raise APIError("only text content parts are supported", param="messages")
            if any(p.text is None for p in content):
                raise APIError(f"messages[{i}].content: a text part needs `text`", param="messages")
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
                             req: _SamplingRequest) -> JSONResponse | StreamingResponse:
    rid = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex
    head = {"id": rid, "created": int(time.time()), "model": engine.name}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await _stream(engine, kind, head, prompts, gen, stop, include_usage)
    results = await engine.run(engine.runtime.generate_ids, prompts, gen, stop)
    return JSONResponse({**head, "object": kind,
                         "choices": [_choice(kind, i, r.text, r.finish_reason, False) for i, r in enumerate(results)],
                         "usage": _usage(prompts, results), "tidar": _tidar_stats(gen, engine, results[0].stats)})


async def _stream(engine: Engine, kind: str, head: dict[str, Any], prompts: list[list[int]], gen: GenerationConfig,
                  stop: list[str], include_usage: bool) -> StreamingResponse:
    """Server-sent events: text as the engine commits it, then a finish chunk per prompt, with
    `stream_options.include_usage` a usage chunk (empty `choices`) as OpenAI's, and [DONE]."""
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
    body = _sse_events(engine, kind, head, prompts, gen, first, events, cancel, include_usage)
    return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _sse_events(engine: Engine, kind: str, head: dict[str, Any], prompts: list[list[int]],
                      gen: GenerationConfig, first: tuple, events: asyncio.Queue,
                      cancel: threading.Event, include_usage: bool) -> AsyncIterator[str]:
    chunk = {**head, "object": "text_completion" if kind == "text_completion" else "chat.completion.chunk"}
    if include_usage:  # as OpenAI's: every chunk says usage null, but the last one after the finish chunks
        chunk["usage"] = None
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
            if i == len(results) - 1:  # the engine's numbers travel with the last finish chunk
                last["tidar"] = _tidar_stats(gen, engine, r.stats)
            yield _sse(last)
        if include_usage:
            yield _sse({**chunk, "choices": [], "usage": _usage(prompts, results)})
        yield _sse("[DONE]")
    finally:
        cancel.set()  # no-op when finished; stops the engine when the client disconnected


# -- the app -------------------------------------------------------------------------------------
def _param_of(message: str) -> str | None:
    """The request field an engine message ("seed must be <= ...") is about, if it names one."""
    word = message.split(" ", 1)[0]
    word = {"max_new_tokens": "max_tokens"}.get(word, word)
    return word if word in ChatRequest.model_fields or word in CompletionRequest.model_fields else None


class _InternalErrors:
    """ASGI middleware: an exception no handler took becomes OpenAI's error body with status 500 and
    `Connection: close`. (Starlette's own handler for Exception re-raises after responding, and the
    server then drops the keep-alive connection without saying so: the client's next request on it
    fails with a reset.) Past the response's start nothing can be sent: the error is re-raised."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as e:
            log.exception("request failed: %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            response = error_response(f"internal error: {type(e).__name__}: {e}", 500, "server_error",
                                      headers={"Connection": "close"})
            await response(scope, receive, send)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is an OpenAI-style JSON body; a traceback goes to the server log, never to a client."""
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e.message, e.status, e.type, e.param, e.code)

    @app.exception_handler(GenerationError)
    async def _generation_error(request: Request, e: GenerationError) -> JSONResponse:
        return error_response(str(e), param=_param_of(str(e)))

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
        return error_response(str(e.detail), e.status_code, type_, headers=getattr(e, "headers", None))

    app.add_middleware(_InternalErrors)


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
        _check_common(engine, req)
        prompts = _completion_prompts(engine, req.prompt)
        longest = max(len(p) for p in prompts)
        max_tokens = _max_tokens(engine, _requested_tokens(req), DEFAULT_COMPLETION_TOKENS, longest, req.block_size)
        gen = _config(engine, req, max_tokens)
        return await _generate_response(engine, "text_completion", prompts, gen, _stop_list(req.stop), req)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatRequest) -> JSONResponse | StreamingResponse:
        _check_common(engine, req)
        ids = _chat_prompt(engine, req.messages)
        max_tokens = _max_tokens(engine, _requested_tokens(req), DEFAULT_CHAT_TOKENS, len(ids), req.block_size)
        gen = _config(engine, req, max_tokens)
        return await _generate_response(engine, "chat.completion", [ids], gen, _stop_list(req.stop), req)

    return app

