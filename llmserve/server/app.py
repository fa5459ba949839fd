"""The FastAPI app: routes, error mapping, auth and log hygiene around an AsyncLLMEngine.

The app holds no engine state of its own; whoever built the engine also shuts it down.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.staticfiles import StaticFiles

from llmserve.engine.async_engine import AsyncLLMEngine
from llmserve.errors import LLMServeError
from llmserve.server.auth import ApiKeyMiddleware
from llmserve.server.browser import JsonOnlyMiddleware, add_cors
from llmserve.server.chat import create_chat_completion
from llmserve.server.completions import create_completion
from llmserve.server.errors import APIError, CatchAllMiddleware, api_error_handler, bad_request, http_exception_handler
from llmserve.server.openapi import GENERATION_ERRORS, JSON_ERRORS, ApiDocs, ReadyStatus
from llmserve.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from llmserve.server.request_log import install_access_log_filter
from llmserve.server.serving import ServerSettings, ServingContext, read_json

__all__ = ["build_app", "ServerSettings"]

STATIC_DIR = Path(__file__).parent / "static"
# The page loads nothing from elsewhere (no CDN), and no other site may frame it.
PAGE_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"}


def build_app(engine: AsyncLLMEngine, settings: ServerSettings | None = None) -> FastAPI:
    ctx = ServingContext(engine, settings or ServerSettings())
    app = FastAPI(title="llmserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(LLMServeError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)
    # Middlewares run outermost last-added: CatchAll, CORS (so preflights need no key), key, JSON-only.
    app.add_middleware(JsonOnlyMiddleware)
    if ctx.settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=ctx.settings.api_key)
    add_cors(app, ctx.settings.allowed_origins)
    app.add_middleware(CatchAllMiddleware)  # added last: outermost of ours, it sees every escape
    docs = ApiDocs("llmserve", api_key_required=bool(ctx.settings.api_key))
    _add_routes(app, ctx, docs)
    _add_page(app)
    static_paths = {f"/static/{p.name}" for p in STATIC_DIR.iterdir() if p.is_file()}
    install_access_log_filter({route.path for route in app.routes} | static_paths)
    return app


def _add_routes(app: FastAPI, ctx: ServingContext, docs: ApiDocs) -> None:
    @app.post("/v1/completions", response_class=Response)
    @docs.operation("Create a completion", body=CompletionRequest, ok=CompletionResponse, stream=CompletionResponse,
                    errors=GENERATION_ERRORS)
    async def completions(request: Request) -> Response:
        return await create_completion(ctx, request)

    @app.post("/v1/chat/completions", response_class=Response)
    @docs.operation("Create a chat completion", body=ChatCompletionRequest, ok=ChatCompletionResponse,
                    stream=ChatCompletionChunk, errors=GENERATION_ERRORS)
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(ctx, request)

    @app.get("/v1/models", response_class=Response)
    @docs.operation("List the served models", ok=ModelList, errors=(401,))
    async def models() -> JSONResponse:
        cards = [ModelCard(id=name, max_model_len=ctx.engine.max_model_len) for name in ctx.model_names]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.get("/health", response_class=Response)
    @docs.operation("Whether the engine loop runs and its last step succeeded", ok_media=None, errors=(503,))
    async def health() -> Response:
        h = ctx.engine.health()
        if h.alive and h.last_heartbeat_age_s < ctx.settings.health_stall_s:
            return Response(status_code=200)
        return APIError(503, "The engine loop is not running.", "service_unavailable_error").response()

    @app.get("/ready", response_class=Response)
    @docs.operation("Whether the server takes requests (503 while it drains)", ok=ReadyStatus, errors=(503,))
    async def ready() -> Response:
        # Ready while the engine takes requests, even right after a failed step (when /health is
        # 503): a balancer that stopped sending requests would leave no step to prove it recovered.
        replicas = ctx.engine.stats().replicas  # with replicas: at least one of them serving
        if ctx.draining or not ctx.engine.health().accepting or (replicas and not any(r[3] for r in replicas)):
            return APIError(503, "The server is not ready.", "service_unavailable_error").response()
        return JSONResponse(ReadyStatus(status="ready").model_dump())

    @app.get("/metrics", response_class=Response)
    @docs.operation("Prometheus metrics (text exposition format)", ok_media="text/plain")
    async def metrics() -> Response:
        text = ctx.metrics.render()
        if ctx.settings.private:
            from llmserve.server.private import allowed_metrics

            text = allowed_metrics(text)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize", response_class=Response)
    @docs.operation("Token ids of a prompt or of chat messages", body=TokenizeRequest, ok=TokenizeResponse,
                    errors=JSON_ERRORS + (404,))
    async def tokenize(request: Request) -> JSONResponse:
        req = await read_json(request, TokenizeRequest)
        ctx.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt and messages.", "prompt")
        if req.prompt is not None:
            tokens = await ctx.tokenization.encode(req.prompt, req.add_special_tokens)
        else:
            tokens = (await ctx.tokenization.chat_prompt(req.messages, req.add_generation_prompt)).token_ids
        return JSONResponse(TokenizeResponse(count=len(tokens), max_model_len=ctx.engine.max_model_len,
                                             tokens=tokens).model_dump())

    @app.post("/detokenize", response_class=Response)
    @docs.operation("Text of token ids", body=DetokenizeRequest, ok=DetokenizeResponse, errors=JSON_ERRORS + (404,))
    async def detokenize(request: Request) -> JSONResponse:
        req = await read_json(request, DetokenizeRequest)
        ctx.check_model(req.model)
        return JSONResponse(DetokenizeResponse(prompt=await ctx.tokenization.decode(req.tokens)).model_dump())

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(docs.schema(app.routes))


def _add_page(app: FastAPI) -> None:
    """The web page at / (chat and server state), plain files with no build step."""
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
