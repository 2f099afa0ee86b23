"""API keys: `Authorization: Bearer <key>` on every /v1 route (401 with OpenAI's `invalid_api_key`
error otherwise). /health and /metrics stay open for probes and scrapers: they answer aggregates
only, and /health adds a key's own learned counts when the request carries that key.

Checked in an ASGI middleware, before the body is read: a client without a key cannot make the
server read (or parse) anything it sends."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from tidar.serve.errors import error_response

KEY_SCOPE = "tidar.key"  # scope["state"] entry: the index of the key the request carries, if valid


class ApiKeys:
    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = [k.encode() for k in keys]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def match(self, authorization: str | None) -> int | None:
        """The index of the key in an `Authorization: Bearer <key>` header, or None."""
        if not authorization or not self._keys:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        given = token.strip().encode("utf-8", "surrogateescape")
        found = None
        for i, key in enumerate(self._keys):  # every key compared, in constant time: no timing hint
            if hmac.compare_digest(given, key) and found is None:
                found = i
        return found


def request_key(scope: Scope) -> int | None:
    """The key a request authenticated with (None: none, or no keys configured)."""
    return scope.get("state", {}).get(KEY_SCOPE)


class Authenticate:
    """ASGI middleware: records which key a request carries, and refuses /v1 without a valid one."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization")
        key = self.keys.match(header.decode("latin-1") if header is not None else None)
        scope.setdefault("state", {})[KEY_SCOPE] = key
        path = scope["path"]
        if key is None and (path == "/v1" or path.startswith("/v1/")):
            message = ("Missing API key: send it as `Authorization: Bearer <key>`" if header is None
                       else "Incorrect API key provided")  # never echoed: it may be someone's real key
            response = error_response(message, 401, code="invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
