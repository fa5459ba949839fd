"""An Oblivious HTTP relay (RFC 9458, section 6.2): forwards encapsulated bodies to one gateway and
the answers back, holding no key. It sends the gateway nothing of the client but the body and its
media type (no address, no forwarding headers, no cookies), adds nothing, and logs nothing per client.

    llmserve relay --gateway http://127.0.0.1:8000/.well-known/ohttp-gateway --port 8100
"""
from __future__ import annotations

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from llmserve.privacy.ohttp import CHUNKED_REQUEST_MEDIA_TYPE, REQUEST_MEDIA_TYPE

MAX_BODY = 4 << 20
_FORWARDED_MEDIA = {REQUEST_MEDIA_TYPE, CHUNKED_REQUEST_MEDIA_TYPE}


def build_relay(gateway_url: str, client: httpx.AsyncClient | None = None) -> Starlette:
    http = client or httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0))

    async def keys(_: Request) -> Response:
        answer = await http.get(gateway_url)
        return Response(answer.content, answer.status_code, media_type=answer.headers.get("content-type"))

    async def forward(request: Request) -> Response:
        media = request.headers.get("content-type", "").split(";")[0].strip()
        if media not in _FORWARDED_MEDIA:
            return Response(b"expected an encapsulated request", 415)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return Response(b"encapsulated request too large", 413)
        outer = http.build_request("POST", gateway_url, content=body, headers={"content-type": media})
        answer = await http.send(outer, stream=True)

        async def relay_body():
            try:
                async for chunk in answer.aiter_raw():
                    yield chunk
            finally:
                await answer.aclose()
        return StreamingResponse(relay_body(), answer.status_code, media_type=answer.headers.get("content-type"))

    return Starlette(routes=[Route("/", forward, methods=["POST"]), Route("/keys", keys, methods=["GET"])])
