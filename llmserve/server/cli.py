"""`llmserve serve [MODEL]`: the OpenAI-compatible server, flags named as `vllm serve` names them."""
from __future__ import annotations

import argparse
import logging
import os

logger = logging.getLogger("llmserve.server")


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    from llmserve.cli import add_engine_args

    p = subparsers.add_parser("serve", help="start the OpenAI-compatible HTTP server")
    p.add_argument("model", nargs="?", default=None, help="HF model folder or .gguf file (default: the embedded model)")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LLMSERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on the API (default: $LLMSERVE_API_KEY)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="names the API answers to; the first is reported in responses")
    p.add_argument("--max-waiting-requests", type=int, default=256,
                   help="beyond this many waiting requests, new ones get 429 with Retry-After")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests get to finish after SIGTERM")
    p.add_argument("--disable-log-requests", action="store_true", help="no per-request log line")
    p.add_argument("--disable-uvicorn-access-log", action="store_true")
    p.set_defaults(func=run_serve)
    return p


def run_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from llmserve.cli import engine_kwargs
    from llmserve.config import EngineConfig
    from llmserve.engine.async_engine import AsyncLLMEngine
    from llmserve.server.app import ServerSettings, build_app
    from llmserve.server.graceful import GracefulServer

    _configure_logging(args.disable_log_requests)
    config = EngineConfig(**engine_kwargs(args), max_waiting_requests=args.max_waiting_requests)
    engine = AsyncLLMEngine.from_config(config)
    try:
        app = build_app(engine, ServerSettings(served_model_names=args.served_model_name or [], api_key=args.api_key))
        uv_config = uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=args.shutdown_timeout,
                                   access_log=not args.disable_uvicorn_access_log, log_level="info")
        ctx = app.state.ctx
        server = GracefulServer(
            uv_config, on_exit=lambda: setattr(ctx, "draining", True),
            on_started=lambda: logger.info("serving %s on http://%s:%d", ctx.model_name, args.host, args.port))
        server.run()
    finally:
        engine.shutdown()
        logger.info("engine stopped")


def _configure_logging(disable_log_requests: bool) -> None:
    # The CLI's default level (WARNING) would hide the server's own lines; they are part of its job.
    server_logger = logging.getLogger("llmserve.server")
    if server_logger.getEffectiveLevel() > logging.INFO:
        server_logger.setLevel(logging.INFO)
    if disable_log_requests:
        logging.getLogger("llmserve.server.requests").setLevel(logging.WARNING)
