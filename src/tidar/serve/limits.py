"""The request body size limit (413 with OpenAI's error body), checked before anything parses it."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tidar.serve.errors import error_response


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` is a 413. A declared Content-Length over the limit is
    refused without reading a byte; a chunked body (no Content-Length) is read up to the limit and
    refused as soon as it passes it. A body within the limit is buffered here and replayed to the
    app, so the app never sees a partial body; after it, `receive` is the server's again (the app
    still learns of a client's disconnect)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        body, disconnected = await self._read(receive)
        if body is None:
            await self._too_large(scope, receive, send)
            return
        await self.app(scope, _replay(body, disconnected, receive), send)

    async def _read(self, receive: Receive) -> tuple[bytes | None, bool]:
        """The whole body (None past the limit), and whether the client left while sending it."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks), True
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None, False
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        # the rest of the body stays unread: the connection cannot carry another request
        response = error_response(f"the request body is larger than this server's limit of {self.max_bytes} bytes",
                                  413, code="request_too_large", headers={"Connection": "close"})
        await response(scope, receive, send)


def _replay(body: bytes, disconnected: bool, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if disconnected:
            return {"type": "http.disconnect"}
        return await receive()

    return replayed
