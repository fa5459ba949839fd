"""Oblivious HTTP (RFC 9458) against its Appendix A worked example, byte for byte, and Binary HTTP
(RFC 9292) against its figures."""
from __future__ import annotations

import pytest

from llmserve.privacy import bhttp
from llmserve.privacy.bhttp import BhttpError, Request, Response
from llmserve.privacy.ohttp import (
    AEAD_CHACHA20_POLY1305,
    Gateway,
    GatewayKey,
    KeyConfig,
    OhttpError,
    encapsulate_request,
    encode_key_configs,
    parse_key_configs,
)

# RFC 9458, Appendix A
SK_R = bytes.fromhex("3c168975674b2fa8e465970b79c8dcf09f1c741626480bd4c6162fc5b6a98e1a")
KEY_CONFIG = bytes.fromhex("01002031e1f05a740102115220e9af918f738674aec95f54db6e04eb705aae8e798155"
                           "00080001000100010003")
REQUEST = bytes.fromhex("00034745540568747470730b6578616d706c652e636f6d012f")
SK_E = bytes.fromhex("bc51d5e930bda26589890ac7032f70ad12e4ecb37abb1b65b1256c9c48999c73")
ENC_REQUEST = bytes.fromhex("010020000100014b28f881333e7c164ffc499ad9796f877f4e1051ee6d31bad19dec96c208b472"
                            "6374e469135906992e1268c594d2a10c695d858c40a026e7965e7d86b83dd440b2c0185204b4d63525")
RESPONSE = bytes.fromhex("0140c8")
SECRET = bytes.fromhex("62d87a6ba569ee81014c2641f52bea36")
RESPONSE_NONCE = bytes.fromhex("c789e7151fcba46158ca84b04464910d")
ENC_RESPONSE = bytes.fromhex("c789e7151fcba46158ca84b04464910d86f9013e404feea014e7be4a441f234f857fbd")

# RFC 9292, figures 8, 9, 11 and 13
FIG8 = bytes.fromhex(
    "0003474554056874747073000a2f68656c6c6f2e747874406c0a757365722d6167656e74346375726c2f372e31362e33206c6962"
    "6375726c2f372e31362e33204f70656e53534c2f302e392e376c207a6c69622f312e322e3304686f73740f7777772e6578616d70"
    "6c652e636f6d0f6163636570742d6c616e677561676506656e2c206d690000")
FIG9 = bytes.fromhex(
    "0203474554056874747073000a2f68656c6c6f2e7478740a757365722d6167656e74346375726c2f372e31362e33206c69626375"
    "726c2f372e31362e33204f70656e53534c2f302e392e376c207a6c69622f312e322e3304686f73740f7777772e6578616d706c65"
    "2e636f6d0f6163636570742d6c616e677561676506656e2c206d6900000000000000000000000000")
FIG11 = bytes.fromhex(
    "0340660772756e6e696e670a22736c65657020313522004067046c696e6b233c2f7374796c652e6373733e3b2072656c3d707265"
    "6c6f61643b2061733d7374796c65046c696e6b243c2f7363726970742e6a733e3b2072656c3d7072656c6f61643b2061733d7363"
    "726970740040c804646174651d4d6f6e2c203237204a756c20323030392031323a32383a353320474d5406736572766572064170"
    "616368650d6c6173742d6d6f6469666965641d5765642c203232204a756c20323030392031393a31353a353620474d5404657461"
    "671422333461613338372d642d3135363865623030220d6163636570742d72616e6765730562797465730e636f6e74656e742d6c"
    "656e67746802353104766172790f4163636570742d456e636f64696e670c636f6e74656e742d747970650a746578742f706c6169"
    "6e003348656c6c6f20576f726c6421204d7920636f6e74656e7420696e636c75646573206120747261696c696e672043524c462e"
    "0d0a0000")
FIG13 = bytes.fromhex("0140c8001d5468697320636f6e74656e7420636f6e7461696e732043524c462e0d0a0d07747261696c65720474657874")
HELLO = [("user-agent", "curl/7.16.3 libcurl/7.16.3 OpenSSL/0.9.7l zlib/1.2.3"), ("host", "www.example.com"),
         ("accept-language", "en, mi")]


def test_key_configuration_round_trips():
    config = KeyConfig.parse(KEY_CONFIG)
    assert config.key_id == 1 and config.suites == ((1, 1), (1, 3))
    assert config.public_key == GatewayKey(1, SK_R).config.public_key
    assert config.encode() == KEY_CONFIG
    assert parse_key_configs(encode_key_configs([config, config])) == [config, config]
    for bad in (KEY_CONFIG[:-1], KEY_CONFIG[:1] + b"\x12\x34" + KEY_CONFIG[3:]):
        with pytest.raises(OhttpError):
            KeyConfig.parse(bad)


def test_gateway_opens_the_example_request_and_seals_the_example_response():
    gateway = Gateway([GatewayKey(1, SK_R)])
    request, ctx = gateway.decapsulate(ENC_REQUEST)
    assert request == REQUEST
    assert ctx.secret == SECRET
    assert ctx.encapsulate(RESPONSE, nonce=RESPONSE_NONCE) == ENC_RESPONSE


def test_client_seals_the_example_request_and_opens_the_example_response():
    enc_request, ctx = encapsulate_request(KeyConfig.parse(KEY_CONFIG), REQUEST, ephemeral_private_key=SK_E)
    assert enc_request == ENC_REQUEST
    assert ctx.decapsulate(ENC_RESPONSE) == RESPONSE


def test_round_trip_with_chacha_and_refusals():
    key = GatewayKey(7)
    gateway = Gateway([key])
    enc_request, client = encapsulate_request(key.config, b"hello", aead_id=AEAD_CHACHA20_POLY1305)
    request, server = gateway.decapsulate(enc_request)
    assert request == b"hello"
    assert client.decapsulate(server.encapsulate(b"world")) == b"world"
    for bad, why in ((enc_request[:20], "truncated"), (bytes([8]) + enc_request[1:], "unknown key id"),
                     (enc_request[:-1] + bytes([enc_request[-1] ^ 1]), "does not decrypt"),
                     (enc_request[:3] + b"\x00\x02" + enc_request[5:], "unsupported cipher suite")):
        with pytest.raises(OhttpError, match=why):
            gateway.decapsulate(bad)
    with pytest.raises(OhttpError, match="does not decrypt"):
        client.decapsulate(server.encapsulate(b"x")[:-1] + b"\x00")


def test_binary_http_figures():
    req = bhttp.decode_request(FIG8)
    assert (req.method, req.scheme, req.authority, req.path, req.headers, req.content) == (
        "GET", "https", "", "/hello.txt", HELLO, b"")
    assert bhttp.encode_request(req) == FIG8
    assert bhttp.decode_request(FIG9) == req
    assert bhttp.encode_request(req, indeterminate=True, padding=10) == FIG9
    for cut in (1, 2):  # empty trailing sections may be left out
        assert bhttp.decode_request(FIG8[:-cut]) == req
    resp = bhttp.decode_response(FIG11)
    assert [s for s, _ in resp.informational] == [102, 103] and resp.status == 200
    assert resp.informational[0][1] == [("running", '"sleep 15"')]
    assert ("content-length", "51") in resp.headers
    assert resp.content == b"Hello World! My content includes a trailing CRLF.\r\n"
    assert bhttp.decode_response(bhttp.encode_response(resp, indeterminate=True)) == resp
    fig13 = bhttp.decode_response(FIG13)
    assert fig13 == Response(200, [], b"This content contains CRLF.\r\n", [("trailer", "text")])
    assert bhttp.encode_response(fig13) == FIG13
    assert bhttp.decode_request(REQUEST) == Request("GET", "https", "example.com", "/")
    assert bhttp.decode_response(RESPONSE) == Response(200)


def test_binary_http_refuses_what_breaks_the_format():
    for bad, why in ((b"\x01" + FIG8[1:], "not a binary HTTP request"), (FIG8[:40], "truncated"),
                     (FIG8 + b"\x01", "padding"), (b"", "truncated")):
        with pytest.raises(BhttpError, match=why):
            bhttp.decode_request(bad)
    upper = bhttp.encode_request(Request(headers=[("Accept", "x")]))
    with pytest.raises(BhttpError, match="invalid field name"):
        bhttp.decode_request(upper)
    with pytest.raises(BhttpError, match="invalid field value"):
        bhttp.decode_request(bhttp.encode_request(Request(headers=[("x", "a\r\nb: c")])))
    with pytest.raises(BhttpError, match="invalid status"):
        bhttp.decode_response(bytes.fromhex("01") + bhttp.encode_varint(700))
