"""`llmserve serve [MODEL]`: the OpenAI-compatible server, flags named as `vllm serve` names them."""
from __future__ import annotations

import argparse
import logging
import os

logger = logging.getLogger("llmserve.server")
API_KEY_ENV = "LLMSERVE_API_KEY"


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    from llmserve.cli import add_engine_args

    p = subparsers.add_parser("serve", help="start the OpenAI-compatible HTTP server")
    p.add_argument("model", nargs="?", default=None, help="HF model folder or .gguf file (default: the embedded model)")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), action=_ApiKeyOnCommandLine,
                   help=f"require 'Authorization: Bearer KEY' on the API. Prefer setting ${API_KEY_ENV} "
                        "(the default): a command-line value is visible to every user in the process list")
    p.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                   help="web origins (e.g. https://app.example.com) allowed to call the API from a browser "
                        "(CORS); none by default")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="names the API answers to; the first is reported in responses")
    p.add_argument("--max-waiting-requests", type=int, default=256,
                   help="beyond this many waiting sequences, new requests get 429 with Retry-After; a request "
                        "with more sequences than this (prompts x n) gets 400")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests get to finish after SIGTERM")
    p.add_argument("--drain-delay", type=float, default=2.0,
                   help="seconds /ready answers 503 after SIGTERM before new connections are refused (so a "
                        "load balancer stops sending first); a second signal cuts it short")
    p.add_argument("--disable-log-requests", action="store_true", help="no per-request log line")
    p.add_argument("--private", action="store_true",
                   help="private mode: stateless computation, no privileged endpoints, an Oblivious HTTP "
                        "gateway, optional Privacy Pass tokens, a signed manifest (see GET /v1/privacy)")
    p.add_argument("--manifest", default=None, metavar="DIR",
                   help="(--private) a signed manifest (manifest.json + manifest.sig from `llmserve manifest build`)")
    p.add_argument("--transparency-log", default=None, metavar="DIR",
                   help="(--private) the operator's transparency log holding the manifest")
    p.add_argument("--token-issuer-key", action="append", default=[], metavar="PEM",
                   help="(--private) require one Privacy Pass token per generation request, from the issuer "
                        "with this public key (PEM; repeatable)")
    p.add_argument("--token-issuer-name", default="llmserve-issuer", help="(--private) the issuer named in challenges")
    p.add_argument("--ohttp-key-rotation", type=float, default=24 * 3600.0, metavar="SECONDS",
                   help="(--private) how often the Oblivious HTTP gateway key rotates")
    p.add_argument("--disable-uvicorn-access-log", action="store_true")
    p.set_defaults(func=run_serve, api_key_on_command_line=False)
    return p


class _ApiKeyOnCommandLine(argparse.Action):
    """Stores --api-key and notes that it came from the command line, for the warning at start."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.api_key_on_command_line = True


def run_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from llmserve.cli import engine_kwargs
    from llmserve.config import EngineConfig
    from llmserve.engine.async_engine import AsyncLLMEngine
    from llmserve.server.app import ServerSettings, build_app
    from llmserve.server.graceful import GracefulServer
    from llmserve.server.streaming import cut_streams

    _configure_logging(args.disable_log_requests)
    warn_if_key_on_command_line(args)
    config = EngineConfig(**engine_kwargs(args), max_waiting_requests=args.max_waiting_requests)
    hardening = None
    if args.private:
        from llmserve.privacy.hardening import harden_process
        from llmserve.privacy.threats import private_config

        refuse_unsafe_private_flags(args)
        config = private_config(config)  # every gated optimization in its safe form, or a refusal
        hardening = harden_process()
    engine = AsyncLLMEngine.from_config(config)
    try:
        settings = ServerSettings(served_model_names=args.served_model_name or [], api_key=args.api_key,
                                  allowed_origins=list(args.allowed_origins), private=args.private)
        app = build_app(engine, settings)
        if args.private:
            from llmserve.server.private import install

            install(app, private_node(args, config, hardening))
        # The access log names client addresses: a private node keeps none.
        access_log = not (args.disable_uvicorn_access_log or args.private)
        uv_config = uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=args.shutdown_timeout,
                                   access_log=access_log, log_level="info")
        ctx = app.state.ctx
        server = GracefulServer(
            uv_config, on_exit=lambda: setattr(ctx, "draining", True),
            on_started=lambda: logger.info("serving %s on http://%s:%d", ctx.model_name, args.host, args.port),
            drain_delay_s=args.drain_delay, on_grace_ending=lambda: cut_streams(ctx))
        server.run()
    finally:
        engine.shutdown()
        logger.info("engine stopped")


def refuse_unsafe_private_flags(args: argparse.Namespace) -> None:
    """--private with a flag that would weaken it is an error that says why, not a quiet downgrade."""
    from llmserve.errors import InvalidRequestError

    if (getattr(args, "log_level", None) or "").upper() in ("DEBUG", "NOTSET"):
        raise InvalidRequestError("--private refuses --log-level debug: debug logs are not limited to the "
                                  "allow-listed fields (counts, lengths, timings, error classes)")
    if args.allowed_origins:
        raise InvalidRequestError("--private refuses --allowed-origins: a web page of another origin could "
                                  "drive the node from a user's browser")
    for path, flag in ((args.manifest, "--manifest"), (args.transparency_log, "--transparency-log")):
        if path is not None and not os.path.isdir(path):
            raise InvalidRequestError(f"{flag} {path} is not a directory")
    if args.transparency_log and not args.manifest:
        raise InvalidRequestError("--transparency-log needs --manifest (the manifest it holds)")


def private_node(args: argparse.Namespace, config, hardening):
    from pathlib import Path

    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from llmserve.errors import InvalidRequestError
    from llmserve.model.default_model import default_model_path
    from llmserve.model.resolve import resolve_model_folder
    from llmserve.server.private import PrivacyOptions, PrivateNode

    keys = []
    for path in args.token_issuer_key:
        try:
            keys.append(load_pem_public_key(Path(path).read_bytes()))
        except (OSError, ValueError) as e:
            raise InvalidRequestError(f"--token-issuer-key {path}: not a readable PEM public key "
                                      f"({type(e).__name__})") from None
    options = PrivacyOptions(Path(args.manifest) if args.manifest else None,
                             Path(args.transparency_log) if args.transparency_log else None, keys,
                             args.token_issuer_name, args.ohttp_key_rotation)
    source = Path(config.model) if config.model and Path(config.model).is_file() else (
        None if config.model else default_model_path())
    return PrivateNode(config, hardening, options, resolve_model_folder(config.model), source)


def warn_if_key_on_command_line(args: argparse.Namespace) -> None:
    if args.api_key_on_command_line:
        logger.warning("--api-key is visible to every user of this machine in the process list; set %s instead",
                       API_KEY_ENV)


def _configure_logging(disable_log_requests: bool) -> None:
    # The CLI's default level (WARNING) would hide the server's own lines; they are part of its job.
    server_logger = logging.getLogger("llmserve.server")
    if server_logger.getEffectiveLevel() > logging.INFO:
        server_logger.setLevel(logging.INFO)
    if disable_log_requests:
        logging.getLogger("llmserve.server.requests").setLevel(logging.WARNING)
