"""What keeps the web pages a user visits from driving a local server behind the user's back.

A browser sends a cross-origin POST without asking first (no CORS preflight) when its body is
`text/plain`, a form or multipart: any page could then run completions on a server at
127.0.0.1. So the API's POST routes take `application/json` only (415 otherwise), which a page can
send cross-origin only after a preflight, and CORS allows no origin unless `--allowed-origins`
names it.
"""
from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from llmserve.server.auth import PROTECTED_PREFIXES
from llmserve.server.errors import APIError

JSON_MEDIA_TYPE = "application/json"


class JsonOnlyMiddleware:
    """415 with OpenAI's error body for a POST to the API whose Content-Type is not JSON."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith(PROTECTED_PREFIXES)
                and media_type(scope) != JSON_MEDIA_TYPE):
            error = APIError(415, "The request body must be JSON, sent with 'Content-Type: application/json'.",
                             "invalid_request_error", code="unsupported_media_type")
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


def media_type(scope: Scope) -> str:
    """The Content-Type without parameters (`; charset=utf-8`), lower-cased; '' when absent."""
    raw = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
    return raw.decode("latin-1").split(";", 1)[0].strip().lower()


def add_cors(app: FastAPI, allowed_origins: list[str]) -> None:
    """Answer preflights and add CORS headers for these origins only (none by default)."""
    if not allowed_origins:
        return
    app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                       allow_headers=["Authorization", "Content-Type"], max_age=600)
