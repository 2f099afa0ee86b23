"""OpenAI's error body for every failure, and the handlers and middleware that guarantee it.

Every error a client sees has the shape {"error": {"message", "type", "param", "code"}}; a traceback
goes to the server log, never to a client."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tidar.decode import GenerationError

log = logging.getLogger(__name__)


class APIError(Exception):
    """A request the server answers with an error status; `headers` travel with it (Retry-After)."""

    def __init__(self, message: str, status: int = 400, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type_, param, code
        self.headers = headers


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


class InternalErrors:
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


def _validation_message(e: RequestValidationError) -> tuple[str, str | None]:
    """pydantic's errors as one message (the first three) and the field it is about."""
    parts, param = [], None
    for err in e.errors()[:3]:
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
    return "; ".join(parts) or "invalid request", param


def add_error_handlers(app: FastAPI, param_of: Any) -> None:
    """`param_of(message)`: the request field an engine message is about, or None."""
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e.message, e.status, e.type, e.param, e.code, e.headers)

    @app.exception_handler(GenerationError)
    async def _generation_error(request: Request, e: GenerationError) -> JSONResponse:
        return error_response(str(e), param=param_of(str(e)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(e)
        return error_response(message, 400, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(str(e.detail), e.status_code, type_, headers=getattr(e, "headers", None))
