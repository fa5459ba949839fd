"""The OpenAPI document at /openapi.json, generated from the pydantic models the routes use.

Routes read and validate their bodies themselves (strict JSON mode, OpenAI's 400 error body; see
serving.read_json), so FastAPI knows nothing of them. Each route instead declares what it takes
and gives with `@docs.operation(...)`, and the document is built from those declarations and the
models' own JSON schemas: a field added to a model shows up here with nothing else to edit.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal, TypeVar

from fastapi.routing import APIRoute
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.routing import BaseRoute

from llmserve.server.auth import PROTECTED_PREFIXES
from llmserve.server.errors import ErrorBody

F = TypeVar("F", bound=Callable[..., Any])
REF_TEMPLATE = "#/components/schemas/{model}"

ERROR_DESCRIPTIONS = {
    400: "Invalid request: a field's type or value, a prompt too long for the context, a request that can "
         "never be admitted",
    401: "Missing or wrong API key (only when the server has one)",
    404: "Unknown model",
    413: "Request body larger than the server takes",
    415: "Request body not sent as application/json",
    429: "Too many requests waiting; retry after the Retry-After header's seconds",
    500: "Internal error (no details are given)",
    503: "The engine is not running, or the server is shutting down",
}
JSON_ERRORS = (400, 401, 413, 415, 500)  # any route that reads a JSON body
GENERATION_ERRORS = JSON_ERRORS + (404, 429, 503)


class ReadyStatus(BaseModel):
    status: Literal["ready"]


@dataclass(frozen=True)
class Operation:
    summary: str
    body: type[BaseModel] | None = None  # the JSON request body
    ok: type[BaseModel] | None = None  # the JSON 200 body (None: no body, or ok_media's text)
    ok_media: str | None = "application/json"
    stream: type[BaseModel] | None = None  # each SSE event's JSON when the body asks for `stream: true`
    errors: tuple[int, ...] = ()


class ApiDocs:
    """Collects each route's Operation (by its endpoint function) and builds the document."""

    def __init__(self, title: str, api_key_required: bool) -> None:
        self.title = title
        self.api_key_required = api_key_required
        self._operations: dict[Callable[..., Any], Operation] = {}
        self._schema: dict[str, Any] | None = None

    def operation(self, summary: str, **kwargs: Any) -> Callable[[F], F]:
        def register(endpoint: F) -> F:
            self._operations[endpoint] = Operation(summary, **kwargs)
            return endpoint
        return register

    def schema(self, routes: list[BaseRoute]) -> dict[str, Any]:
        if self._schema is None:
            self._schema = self._build(routes)
        return self._schema

    def _build(self, routes: list[BaseRoute]) -> dict[str, Any]:
        documented = [(r, self._operations[r.endpoint]) for r in routes
                      if isinstance(r, APIRoute) and r.endpoint in self._operations]
        # One schema generation for all models: pydantic names the shared ones once, and splits a
        # model into -Input and -Output only where its two modes differ.
        wanted = {(ErrorBody, "serialization")}
        for _, op in documented:
            wanted |= {(op.body, "validation"), (op.ok, "serialization"), (op.stream, "serialization")}
        pairs = sorted((w for w in wanted if w[0] is not None), key=lambda w: (w[0].__name__, w[1]))
        refs, defs = models_json_schema(pairs, ref_template=REF_TEMPLATE)
        paths: dict[str, dict[str, Any]] = {}
        for route, op in documented:
            for method in sorted(route.methods - {"HEAD"}):
                paths.setdefault(route.path, {})[method.lower()] = self._operation(route.path, op, refs)
        doc: dict[str, Any] = {
            "openapi": "3.1.0",
            "info": {"title": self.title, "version": _version()},
            "paths": paths,
            "components": {"schemas": defs.get("$defs", {})},
        }
        if self.api_key_required:
            doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        return doc

    def _operation(self, path: str, op: Operation, refs: dict) -> dict[str, Any]:
        out: dict[str, Any] = {"summary": op.summary, "operationId": _operation_id(path)}
        if op.body is not None:
            out["requestBody"] = {"required": True,
                                  "content": {"application/json": {"schema": refs[(op.body, "validation")]}}}
        ok: dict[str, Any] = {"description": "Success"}
        content: dict[str, Any] = {}
        if op.ok is not None:
            content[op.ok_media] = {"schema": refs[(op.ok, "serialization")]}
        elif op.ok_media is not None:
            content[op.ok_media] = {"schema": {"type": "string"}}
        if op.stream is not None:
            name = refs[(op.stream, "serialization")]["$ref"].rsplit("/", 1)[-1]
            # The schema of each event (its fields, as SSE parsers and OpenAPI 3.2's itemSchema see them).
            content["text/event-stream"] = {
                "schema": {"type": "object", "required": ["data"], "description": (
                    f"With `stream: true`: server-sent events `data: <{name} as JSON>`, then `data: [DONE]`. "
                    "An error after the stream began comes as one `data: <ErrorBody as JSON>` event before "
                    "`data: [DONE]`."),
                    "properties": {"data": {"type": "string"}, "event": {"type": "string"},
                                   "id": {"type": "string"}, "retry": {"type": "integer"}}},
                "x-event-schema": refs[(op.stream, "serialization")],
            }
        if content:
            ok["content"] = content
        responses: dict[str, Any] = {"200": ok}
        protected = self.api_key_required and path.startswith(PROTECTED_PREFIXES)
        for status in sorted(op.errors):
            if status != 401 or protected:  # a 401 comes only from a server that has a key
                responses[str(status)] = _error_response(status, refs)
        out["responses"] = responses
        if protected:
            out["security"] = [{"bearer": []}]
        return out


def _error_response(status: int, refs: dict) -> dict[str, Any]:
    response: dict[str, Any] = {"description": ERROR_DESCRIPTIONS[status],
                                "content": {"application/json": {"schema": refs[(ErrorBody, "serialization")]}}}
    if status == 429:
        response["headers"] = {"Retry-After": {"description": "Seconds to wait before retrying",
                                               "schema": {"type": "string", "pattern": "^[0-9]+$"}}}
    return response


def _operation_id(path: str) -> str:
    return path.strip("/").replace("/", "_").replace(".", "_") or "root"


def _version() -> str:
    try:
        return version("llmserve")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0"
