"""Client -> relay -> gateway -> app and back, on loopback, whole and streamed: the relay carries only
ciphertext, the app sees no client address, and bad encapsulations are clear 4xx answers."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from llmserve.privacy.client import ObliviousClient
from llmserve.privacy.gateway import WELL_KNOWN, OhttpGatewayMiddleware
from llmserve.privacy.ohttp import Gateway, GatewayKey, KeyConfig, OhttpError, encapsulate_request
from llmserve.privacy.relay import build_relay

CANARY = "canary-7f3a9c"
seen_clients: list = []


async def echo(request: Request) -> JSONResponse:
    seen_clients.append(request.client)
    body = await request.json()
    return JSONResponse({"echo": body, "path": request.url.path, "auth": request.headers.get("authorization")})


async def tokens(request: Request) -> StreamingResponse:
    async def events():
        for i in range(4):
            yield f"data: {json.dumps({'token': f'{CANARY}-{i}'})}\n\n"
            await asyncio.sleep(0.05)
        yield "data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream")


def _serve(app) -> tuple[str, uvicorn.Server, threading.Thread]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server, thread


class Capture(httpx.AsyncHTTPTransport):
    """The relay's outbound traffic, kept for inspection."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.received: list[bytes] = []

    async def handle_async_request(self, request):
        self.sent.append(request.content + b"".join(k + b":" + v for k, v in request.headers.raw))
        response = await super().handle_async_request(request)
        return httpx.Response(response.status_code, headers=response.headers, stream=_Recorded(response.stream, self))


class _Recorded(httpx.AsyncByteStream):
    def __init__(self, inner, capture: Capture) -> None:
        self.inner, self.capture = inner, capture

    async def __aiter__(self):
        async for chunk in self.inner:
            self.capture.received.append(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture(scope="module")
def network():
    app = Starlette(routes=[Route("/v1/echo", echo, methods=["POST"]), Route("/v1/stream", tokens, methods=["POST"])])
    gateway = Gateway([GatewayKey(1)])
    server_url, server, t1 = _serve(OhttpGatewayMiddleware(app, gateway, max_body=64 << 10))
    capture = Capture()
    relay_url, relay, t2 = _serve(build_relay(server_url + WELL_KNOWN, httpx.AsyncClient(transport=capture)))
    yield dict(server=server_url, relay=relay_url, gateway=gateway, capture=capture)
    for s, t in ((relay, t2), (server, t1)):
        s.should_exit = True
        t.join(timeout=10)


def test_round_trip_through_the_relay(network):
    config = ObliviousClient.fetch_keys(network["relay"] + "/keys")
    assert config == network["gateway"].keys[1].config
    client = ObliviousClient(network["relay"] + "/", config)
    status, headers, body = client.request("POST", "/v1/echo", json.dumps({"q": CANARY}).encode(),
                                           {"authorization": "PrivateToken token=abc"})
    assert status == 200
    assert json.loads(body) == {"echo": {"q": CANARY}, "path": "/v1/echo", "auth": "PrivateToken token=abc"}
    assert seen_clients[-1] is None  # the app never learns an address
    traffic = b"".join(network["capture"].sent + network["capture"].received)
    assert CANARY.encode() not in traffic and b"authorization" not in traffic.lower().replace(b"content-type", b"")
    assert b"x-forwarded" not in traffic.lower()


def test_a_stream_arrives_piece_by_piece(network):
    client = ObliviousClient(network["relay"] + "/", network["gateway"].keys[1].config)
    items = list(client.stream("POST", "/v1/stream", b"{}"))
    status, headers = items[0]
    assert status == 200 and ("content-type", "text/event-stream; charset=utf-8") in headers
    pieces = [p.decode() for p in items[1:]]
    assert len(pieces) >= 5 and pieces[-1] == "data: [DONE]\n\n"
    assert "".join(pieces).count(CANARY) == 4
    assert CANARY.encode() not in b"".join(network["capture"].received)


def test_bad_encapsulations_are_clear_4xx(network):
    url = network["server"] + WELL_KNOWN
    config = network["gateway"].keys[1].config
    enc, _ = encapsulate_request(config, b"\x00\x03GET\x05https\x00\x01/")
    cases = [
        (enc[:30], "message/ohttp-req", 400),
        (bytes([9]) + enc[1:], "message/ohttp-req", 422),  # a key id the gateway does not have
        (enc[:-1] + bytes([enc[-1] ^ 1]), "message/ohttp-req", 400),
        (enc, "application/json", 415),
        (b"\x00" * (65 << 10), "message/ohttp-req", 413),
    ]
    for body, media, code in cases:
        answer = httpx.post(url, content=body, headers={"content-type": media})
        assert answer.status_code == code, (media, code)
    garbage, _ = encapsulate_request(config, b"\x07not bhttp")
    assert httpx.post(url, content=garbage, headers={"content-type": "message/ohttp-req"}).status_code == 400
    assert httpx.get(url).headers["content-type"] == "application/ohttp-keys"
    with pytest.raises(OhttpError):
        ObliviousClient(network["relay"] + "/", KeyConfig(1, bytes(32))).request("POST", "/v1/echo", b"{}")


def test_gateway_keys_rotate_and_the_previous_key_stays_live(monkeypatch):
    from llmserve.privacy import ohttp
    from llmserve.server import private

    now = [1000.0]
    monkeypatch.setattr(private.time, "monotonic", lambda: now[0])
    gateway = private.RotatingGateway(period_s=60.0)
    first = parse_ids(gateway.key_configs())
    assert first == [0]
    enc, _ = ohttp.encapsulate_request(gateway.keys[0].config, b"\x00\x03GET\x05https\x00\x01/")
    now[0] += 61
    assert parse_ids(gateway.key_configs()) == [0, 1]  # a new key; the old one still opens
    assert gateway.decapsulate(enc)[0].startswith(b"\x00\x03GET")
    now[0] += 61
    assert parse_ids(gateway.key_configs()) == [1, 2]  # two periods on: the first key is gone
    with pytest.raises(OhttpError, match="unknown key id"):
        gateway.decapsulate(enc)


def parse_ids(data: bytes) -> list[int]:
    from llmserve.privacy.ohttp import parse_key_configs

    return sorted(c.key_id for c in parse_key_configs(data))
