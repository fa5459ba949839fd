"""Bearer API key on the API routes. A middleware, so a bad key is refused before the body is read."""
from __future__ import annotations

import json
import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from llmserve.server.errors import APIError

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")  # health, readiness and metrics stay open


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIXES) or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        error = APIError(401, "Missing or invalid API key.", "authentication_error", code="invalid_api_key")
        body = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})

    def _authorized(self, scope: Scope) -> bool:
        got = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        return secrets.compare_digest(got, self._expected)
