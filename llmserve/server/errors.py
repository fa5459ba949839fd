"""OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`, with the right status.

Messages name parameters and sizes, never request content. A 500 says nothing about internals;
its log line carries the exception type and stack frames, not the exception's message (which
could quote content).
"""
from __future__ import annotations

import logging
import re
import traceback
from dataclasses import dataclass, field

from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmserve.engine.async_engine import EngineOverloadedError
from llmserve.errors import EngineDeadError, EngineStepError, InvalidRequestError, LLMServeError, PromptTooLongError

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1
INTERNAL_MESSAGE = "The server had an error while processing your request."
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}
_STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
                 429: "rate_limit_error", 503: "service_unavailable_error"}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """Every error response's body (and a stream's in-band error event); the OpenAPI schema's too."""
    error: ErrorDetail


@dataclass
class APIError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict:
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorBody(error=detail).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param)


def internal_error() -> APIError:
    return APIError(500, INTERNAL_MESSAGE, "internal_server_error")


def from_validation_error(e: ValidationError) -> APIError:
    """The first problem, located by its field path; pydantic's input echo is left out."""
    err = e.errors(include_url=False, include_input=False, include_context=False)[0]
    if err["type"] == "json_invalid":
        return bad_request("The request body is not valid JSON.")
    path = [str(p) for p in err["loc"] if isinstance(p, int) or _is_field(str(p))]
    if not path:
        return bad_request(f"Invalid request body: {err['msg']}.")
    where = ".".join(path)
    return bad_request(f"Invalid value for '{where}': {err['msg']}.", param=where)


def _is_field(part: str) -> bool:
    # Union branches show up in locations as type names ('str', 'list[int]', 'TextPart').
    return re.fullmatch(r"[a-z_][a-z0-9_]*", part) is not None and part not in _TYPE_NAMES


def from_engine_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineOverloadedError):
        return APIError(429, "The server is overloaded; retry later.", "rate_limit_error",
                        code="overloaded", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, PromptTooLongError):
        return APIError(400, str(e), "invalid_request_error", code="context_length_exceeded")
    if isinstance(e, InvalidRequestError):  # SamplingParams and add_request messages name fields only
        return bad_request(str(e))
    if isinstance(e, EngineDeadError):
        return APIError(503, "The engine is not running.", "service_unavailable_error")
    if isinstance(e, EngineStepError):  # the engine loop logged it; the engine goes on, so a retry may work
        return internal_error()
    if isinstance(e, LLMServeError):
        return bad_request(str(e))
    log_internal(e)
    return internal_error()


def log_internal(e: BaseException) -> None:
    frames = "".join(traceback.format_tb(e.__traceback__))
    logger.error("internal error %s (message withheld)\n%s", type(e).__name__, frames)


# ---- handlers -----------------------------------------------------------------------------
async def api_error_handler(_: Request, e: Exception) -> JSONResponse:
    return from_engine_error(e).response()


async def http_exception_handler(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, StarletteHTTPException)
    status = e.status_code
    message = {404: "Not found.", 405: "Method not allowed."}.get(status, str(e.detail))
    error_type = _STATUS_TYPES.get(status, "invalid_request_error")
    return APIError(status, message, error_type, headers=dict(e.headers or {})).response()


class CatchAllMiddleware:
    """Turns any exception that escapes a handler into a generic 500 before Starlette's error
    middleware could log it with its message (which could quote request content)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception as e:  # noqa: BLE001 - the last line of defence
            log_internal(e)
            if started:
                return  # mid-response: nothing sensible to add; the connection just ends
            await internal_error().response()(scope, receive, send)
