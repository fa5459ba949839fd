"""The Oblivious HTTP gateway (RFC 9458) in front of an ASGI app, at the well-known URI of RFC 9540.

GET /.well-known/ohttp-gateway answers the live key configurations (application/ohttp-keys).
POST with message/ohttp-req: the Binary HTTP request inside is served by the wrapped app and its
whole answer goes back as message/ohttp-res. POST with message/ohttp-chunked-req: the answer
streams back as message/ohttp-chunked-res, one sealed chunk per piece the app sends (an
indeterminate-length Binary HTTP response), so a chat streams token by token.

The inner request carries no client address (scope "client" is None) and nothing of the outer
request but what the client encrypted; errors are short 4xx answers naming the check that failed,
never the content.
"""
from __future__ import annotations

import asyncio
from typing import Any

from llmserve.privacy import bhttp
from llmserve.privacy.ohttp import (
    CHUNKED_REQUEST_MEDIA_TYPE,
    CHUNKED_RESPONSE_MEDIA_TYPE,
    KEYS_MEDIA_TYPE,
    REQUEST_MEDIA_TYPE,
    RESPONSE_MEDIA_TYPE,
    Gateway,
    OhttpError,
    decapsulate_chunked_request,
)

WELL_KNOWN = "/.well-known/ohttp-gateway"
DEFAULT_MAX_BODY = 4 << 20


class OhttpGatewayMiddleware:
    def __init__(self, app, gateway: Gateway, max_body: int = DEFAULT_MAX_BODY) -> None:
        self.app, self.gateway, self.max_body = app, gateway, max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != WELL_KNOWN:
            return await self.app(scope, receive, send)
        if scope["method"] == "GET":
            return await _plain(send, 200, self.gateway.key_configs(), KEYS_MEDIA_TYPE)
        if scope["method"] != "POST":
            return await _plain(send, 405, b"use GET for the key configuration, POST for requests")
        media = dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip().decode("latin-1")
        if media not in (REQUEST_MEDIA_TYPE, CHUNKED_REQUEST_MEDIA_TYPE):
            return await _plain(send, 415, b"expected message/ohttp-req or message/ohttp-chunked-req")
        body = await _read_body(receive, self.max_body)
        if body is None:
            return await _plain(send, 413, b"encapsulated request too large")
        try:
            if media == REQUEST_MEDIA_TYPE:
                plain, context = self.gateway.decapsulate(body)
            else:
                plain, sealer = decapsulate_chunked_request(self.gateway, body)
            request = bhttp.decode_request(plain)
        except OhttpError as e:
            code = 422 if "key id" in str(e) or "cipher suite" in str(e) else 400
            return await _plain(send, code, str(e).encode())
        except bhttp.BhttpError as e:
            return await _plain(send, 400, f"not a binary HTTP request: {e}".encode())
        inner = _inner_scope(scope, request)
        if media == REQUEST_MEDIA_TYPE:
            status, headers, content = await _collect(self.app, inner, request.content, receive)
            answer = bhttp.encode_response(bhttp.Response(status, headers, content))
            return await _plain(send, 200, context.encapsulate(answer), RESPONSE_MEDIA_TYPE)
        await _stream(self.app, inner, request.content, receive, send, sealer)


async def _plain(send, status: int, body: bytes, media: str = "text/plain; charset=utf-8") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", media.encode()), (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive, limit: int) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b""
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _inner_scope(outer: dict[str, Any], req: bhttp.Request) -> dict[str, Any]:
    path, _, query = req.path.partition("?")
    headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in req.headers]
    if req.content and not any(n == b"content-length" for n, _ in headers):
        headers.append((b"content-length", str(len(req.content)).encode()))
    return {"type": "http", "asgi": outer.get("asgi", {"version": "3.0"}), "http_version": "1.1",
            "method": req.method, "scheme": "https", "path": path, "raw_path": path.encode("latin-1"),
            "query_string": query.encode("latin-1"), "root_path": "", "headers": headers,
            "client": None, "server": outer.get("server"), "state": dict(outer.get("state", {})),
            "extensions": {"llmserve.oblivious": True}}


def _inner_receive(content: bytes, outer_receive):
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": content, "more_body": False}
        return await outer_receive()  # waits for the relay to disconnect, as a client would
    return receive


async def _collect(app, scope, content: bytes, outer_receive) -> tuple[int, list[tuple[str, str]], bytes]:
    status, headers, body = 500, [], []

    async def send(message):
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status = message["status"]
            headers = _fields(message.get("headers", []))
        elif message["type"] == "http.response.body":
            body.append(message.get("body", b""))
    await app(scope, _inner_receive(content, outer_receive), send)
    return status, headers, b"".join(body)


async def _stream(app, scope, content: bytes, outer_receive, send, sealer) -> None:
    queue: asyncio.Queue = asyncio.Queue()

    async def inner_send(message):
        await queue.put(message)

    async def run():
        try:
            await app(scope, _inner_receive(content, outer_receive), inner_send)
        finally:
            await queue.put(None)
    task = asyncio.create_task(run())
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", CHUNKED_RESPONSE_MEDIA_TYPE.encode()), (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": sealer.nonce, "more_body": True})
    started = False
    try:
        while (message := await queue.get()) is not None:
            if message["type"] == "http.response.start":
                head = bhttp.encode_varint(3) + bhttp.encode_varint(message["status"])
                head += b"".join(bhttp.encode_varint(len(n)) + n + bhttp.encode_varint(len(v)) + v
                                 for n, v in ((n.lower(), v) for n, v in message.get("headers", [])))
                await send({"type": "http.response.body", "body": sealer.chunk(head + b"\x00"), "more_body": True})
                started = True
            elif message["type"] == "http.response.body" and message.get("body"):
                piece = message["body"]
                await send({"type": "http.response.body", "more_body": True,
                            "body": sealer.chunk(bhttp.encode_varint(len(piece)) + piece)})
        tail = b"\x00\x00" if started else bhttp.encode_varint(3) + bhttp.encode_varint(500) + b"\x00\x00\x00"
        await send({"type": "http.response.body", "body": sealer.final(tail), "more_body": False})
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _fields(raw: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in raw]
