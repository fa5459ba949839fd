"""The server in private mode (`llmserve serve --private`): what it adds to and takes from the app.

- Non-targetability: an Oblivious HTTP gateway at /.well-known/ohttp-gateway (keys rotating on a
  schedule, the previous key live for one more period), and, when issuer keys are given, one valid
  unspent Privacy Pass token (PrivateToken) per generation request, 401 with a challenge otherwise.
- No privileged access: no tokenize/detokenize of arbitrary ids, no docs; /metrics only an
  allow-list of aggregate series; settings frozen at start.
- Transparency: GET /v1/privacy (every gated optimization, its threats and state, the process
  hardening) and GET /v1/privacy/manifest (the signed manifest, its log inclusion proof, a fresh
  measurement of the node's files).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.responses import JSONResponse, Response

from llmserve.privacy.gateway import OhttpGatewayMiddleware
from llmserve.privacy.hardening import Hardening
from llmserve.privacy.ohttp import Gateway, GatewayKey
from llmserve.privacy.privacypass import TokenChallenge, TokenError, TokenRedeemer, b64url
from llmserve.privacy.threats import describe
from llmserve.privacy.translog import TransparencyLog
from llmserve.privacy.verify import node_document

FORBIDDEN_PATHS = frozenset({"/tokenize", "/detokenize", "/docs", "/redoc"})
TOKEN_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
# Aggregate series a private node may publish: counts, sizes and latency distributions, no labels
# but the model's name.
METRIC_PREFIXES = ("llmserve:num_requests_", "llmserve:kv_cache_usage", "llmserve:request_success",
                   "llmserve:prompt_tokens", "llmserve:generation_tokens", "llmserve:time_to_first_token",
                   "llmserve:time_per_output_token", "llmserve:e2e_request_latency", "llmserve:request_queue_time")


@dataclass
class PrivacyOptions:
    manifest_dir: Path | None = None
    transparency_log: Path | None = None
    issuer_keys: list[rsa.RSAPublicKey] = field(default_factory=list)
    issuer_name: str = "llmserve-issuer"
    ohttp_rotation_s: float = 24 * 3600.0


class RotatingGateway(Gateway):
    """An OHTTP gateway whose key rotates every `period_s`; the previous key stays live one more
    period so requests sealed just before a rotation still open."""

    def __init__(self, period_s: float) -> None:
        super().__init__([GatewayKey(0)])
        self.period_s, self._born = period_s, {0: time.monotonic()}

    def rotate_if_due(self) -> None:
        now = time.monotonic()
        newest = max(self._born, key=self._born.get)
        if now - self._born[newest] < self.period_s:
            return
        key_id = (newest + 1) % 256
        self.keys[key_id], self._born[key_id] = GatewayKey(key_id), now
        for old in [k for k, born in self._born.items() if now - born >= 2 * self.period_s]:
            del self.keys[old], self._born[old]

    def key_configs(self) -> bytes:
        self.rotate_if_due()
        return super().key_configs()

    def decapsulate(self, enc_request: bytes):
        self.rotate_if_due()
        return super().decapsulate(enc_request)


class TokenMiddleware:
    """One valid, unspent PrivateToken per generation request (RFC 9577); 401 with a challenge otherwise."""

    def __init__(self, app, redeemer: TokenRedeemer) -> None:
        self.app, self.redeemer = app, redeemer

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] not in TOKEN_PATHS:
            return await self.app(scope, receive, send)
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1") or None
        try:
            self.redeemer.redeem(auth)
        except TokenError as e:
            body = JSONResponse({"error": {"message": f"a valid Privacy Pass token is required ({e})",
                                           "type": "authentication_error", "param": None, "code": "token_required"}},
                                status_code=401, headers={"WWW-Authenticate": self.redeemer.challenge_header()})
            return await body(scope, receive, send)
        await self.app(scope, receive, send)


@dataclass(repr=False)
class PrivateNode:
    config: object  # the frozen, private EngineConfig
    hardening: Hardening
    options: PrivacyOptions
    model_folder: Path
    model_source: Path | None = None
    gateway: RotatingGateway = None  # type: ignore[assignment]
    redeemer: TokenRedeemer | None = None

    def __post_init__(self) -> None:
        self.gateway = self.gateway or RotatingGateway(self.options.ohttp_rotation_s)
        if self.options.issuer_keys and self.redeemer is None:
            self.redeemer = TokenRedeemer(self.options.issuer_keys, TokenChallenge(self.options.issuer_name))

    def __repr__(self) -> str:  # no keys, nonces or paths: what is on, nothing more
        return (f"PrivateNode(tokens_required={self.redeemer is not None}, "
                f"manifest={self.options.manifest_dir is not None}, key_ids={sorted(self.gateway.keys)})")

    def privacy_document(self) -> dict:
        return {"private": True, "optimizations": describe(self.config),
                "hardening": dataclasses.asdict(self.hardening),
                "oblivious_http": {"gateway": "/.well-known/ohttp-gateway",
                                   "chunked": "draft-ietf-ohai-chunked-ohttp", "key_ids": sorted(self.gateway.keys)},
                "tokens_required": self.redeemer is not None,
                "token_challenge": b64url(self.redeemer.challenge.encode()) if self.redeemer else None,
                "manifest": self.options.manifest_dir is not None,
                "forbidden_endpoints": sorted(FORBIDDEN_PATHS)}

    def manifest_document(self) -> dict | None:
        if self.options.manifest_dir is None:
            return None
        log = TransparencyLog(self.options.transparency_log) if self.options.transparency_log else None
        return node_document(self.options.manifest_dir, self.model_folder, self.model_source, log)


def install(app, node: PrivateNode, docs=None) -> None:
    """Turn a built app into its private form (before it serves anything)."""
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) not in FORBIDDEN_PATHS]
    app.state.private_node = node

    @app.get("/v1/privacy")
    async def privacy() -> JSONResponse:
        return JSONResponse(node.privacy_document())

    @app.get("/v1/privacy/manifest")
    async def manifest() -> Response:
        doc = node.manifest_document()
        if doc is None:
            return JSONResponse({"error": {"message": "this node was started without a signed manifest",
                                           "type": "not_found_error", "param": None, "code": "no_manifest"}},
                                status_code=404)
        return JSONResponse(doc)

    if node.redeemer is not None:
        app.add_middleware(TokenMiddleware, redeemer=node.redeemer)
    app.add_middleware(OhttpGatewayMiddleware, gateway=node.gateway)


def allowed_metrics(text: bytes) -> bytes:
    """The /metrics exposition filtered to the allow-list (HELP/TYPE lines follow their series)."""
    keep = []
    for line in text.decode().splitlines():
        name = line.split(" ")[2] if line.startswith("# ") and len(line.split(" ")) > 2 else line.split("{")[0].split(" ")[0]
        if name.startswith(METRIC_PREFIXES):
            keep.append(line)
    return ("\n".join(keep) + "\n").encode()
