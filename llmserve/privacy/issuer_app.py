"""The Privacy Pass issuer over HTTP (RFC 9578): its directory at the well-known URI and the
token-request endpoint. The attester's credential (Authorization: Bearer) is what the issuance rate
limit counts; the issuer sees only blinded messages, never a token or a prompt."""
from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmserve.privacy.privacypass import (
    REQUEST_MEDIA_TYPE,
    RESPONSE_MEDIA_TYPE,
    TOKEN_TYPE,
    Issuer,
    TokenError,
    b64url,
    public_key_spki,
)

DIRECTORY = "/.well-known/private-token-issuer-directory"
REQUEST_URI = "/token-request"


def build_issuer_app(issuer: Issuer) -> Starlette:
    async def directory(_: Request) -> JSONResponse:
        return JSONResponse({"issuer-request-uri": REQUEST_URI, "issuer-name": issuer.name,
                             "token-keys": [{"token-type": TOKEN_TYPE, "token-key": b64url(public_key_spki(issuer.public_key))}]},
                            media_type="application/private-token-issuer-directory")

    async def token_request(request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip() != REQUEST_MEDIA_TYPE:
            return Response(b"expected application/private-token-request", 415)
        attester = request.headers.get("authorization", "anonymous")
        body = await request.body()
        try:
            blind_sig = issuer.issue(body, attester)
        except TokenError as e:
            return Response(str(e).encode(), 429 if "rate limit" in str(e) else 400)
        return Response(blind_sig, 200, media_type=RESPONSE_MEDIA_TYPE)

    return Starlette(routes=[Route(DIRECTORY, directory, methods=["GET"]),
                             Route(REQUEST_URI, token_request, methods=["POST"])])
