"""The ASGI app: routes and the middleware stack (see `tidar.serve.server` for the whole picture)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tidar.runtime import Runtime
from tidar.serve import validation as v
from tidar.serve.auth import Authenticate, request_key
from tidar.serve.config import ServerConfig
from tidar.serve.errors import InternalErrors, add_error_handlers
from tidar.serve.limits import BodyLimit
from tidar.serve.metrics import RequestMetrics
from tidar.serve.responses import default_block_size, generate_response
from tidar.serve.schema import ChatRequest, CompletionRequest, param_of
from tidar.serve.state import ServerState


def create_app(runtime: Runtime, model_name: str | None = None, config: ServerConfig | None = None) -> FastAPI:
    """The ASGI app serving `runtime`; `model_name` is what /v1/models and responses report.
    Raises ServerConfigError for settings that cannot serve safely (learning without API keys)."""
    name = model_name or (Path(runtime.name).name if runtime.name else "tidar")
    state = ServerState(runtime, name, config or ServerConfig())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        state.close()

    app = FastAPI(title="tidar", description="OpenAI-compatible TiDAR server", lifespan=lifespan)
    app.state.server = state
    add_error_handlers(app, param_of)
    _add_middleware(app, state)
    _add_info_routes(app, state)
    _add_generation_routes(app, state)
    return app


def _add_middleware(app: FastAPI, state: ServerState) -> None:
    """Added innermost first. Metrics see every answer; CORS headers ride on every answer, errors
    and 500s included, and a preflight needs no key; the key is checked before the body is read,
    and the body's size before anything parses it."""
    app.add_middleware(BodyLimit, max_bytes=state.config.max_body_bytes)
    app.add_middleware(Authenticate, keys=state.keys)
    app.add_middleware(InternalErrors)
    if state.config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=state.config.allowed_origins,
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["Retry-After"])
    app.add_middleware(RequestMetrics, metrics=state.metrics)


def _add_info_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        # reads counters only: answers at once while the worker is busy
        worker = state.worker
        return {"status": "ok", "model": state.name, "queue_depth": worker.depth, "max_queue": worker.max_queue,
                "saturated": worker.saturated, "running": worker.running_batch,
                **state.learning.counts(request_key(request.scope))}

    @app.get("/metrics")
    async def metrics() -> Response:
        return state.metrics.render()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": state.name, "object": "model", "created": state.created, "owned_by": "tidar",
            "max_model_len": state.runtime.model.config.max_position_embeddings,
            "block_size": default_block_size(state)}]}


def _add_generation_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        arrived = time.monotonic()
        v.check_common(state, req)
        prompts = await state.off_loop(v.completion_prompts, state, req.prompt)
        max_tokens = v.max_tokens(state, req, v.DEFAULT_COMPLETION_TOKENS, max(len(p) for p in prompts))
        gen = v.generation_config(state, req, max_tokens)
        return await generate_response(state, request, "text_completion", prompts, gen, v.stop_list(req.stop), req,
                                       arrived)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatRequest, request: Request) -> JSONResponse | StreamingResponse:
        arrived = time.monotonic()
        v.check_common(state, req)
        ids = await state.off_loop(v.chat_prompt, state, req.messages)
        max_tokens = v.max_tokens(state, req, v.DEFAULT_CHAT_TOKENS, len(ids))
        gen = v.generation_config(state, req, max_tokens)
        return await generate_response(state, request, "chat.completion", [ids], gen, v.stop_list(req.stop), req,
                                       arrived)
