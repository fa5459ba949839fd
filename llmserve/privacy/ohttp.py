"""Oblivious HTTP (RFC 9458): key configurations, request encapsulation and response
encapsulation, for the gateway (server side) and for clients. HPKE (RFC 9180) is pyhpke's;
HKDF and the AEADs are the `cryptography` package's.

Suites: KEM DHKEM(X25519, HKDF-SHA256), KDF HKDF-SHA256, AEAD AES-128-GCM or ChaCha20-Poly1305.

  request:  hdr = key_id(1) kem_id(2) kdf_id(2) aead_id(2)
            enc, ctx = SetupBaseS(pkR, "message/bhttp request" || 0x00 || hdr)
            enc_request = hdr || enc || ctx.Seal("", request)
  response: secret = ctx.Export("message/bhttp response", max(Nn, Nk))
            prk = Extract(enc || response_nonce, secret), key = Expand(prk, "key", Nk),
            nonce = Expand(prk, "nonce", Nn), enc_response = response_nonce || Seal(key, nonce, "", response)
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from pyhpke import AEADId, CipherSuite, KDFId, KEMId, KEMKeyPair

KEM_X25519, KDF_HKDF_SHA256, AEAD_AES_128_GCM, AEAD_CHACHA20_POLY1305 = 0x0020, 0x0001, 0x0001, 0x0003
_AEADS = {AEAD_AES_128_GCM: (AEADId.AES128_GCM, AESGCM, 16, 12), AEAD_CHACHA20_POLY1305: (AEADId.CHACHA20_POLY1305, ChaCha20Poly1305, 32, 12)}
REQUEST_LABEL, RESPONSE_LABEL = b"message/bhttp request", b"message/bhttp response"
REQUEST_MEDIA_TYPE, RESPONSE_MEDIA_TYPE, KEYS_MEDIA_TYPE = "message/ohttp-req", "message/ohttp-res", "application/ohttp-keys"
_NENC = 32  # X25519's encapsulated key


class OhttpError(ValueError):
    """A malformed or undecryptable message, an unknown key or suite (never any content)."""


@dataclass(frozen=True)
class KeyConfig:
    key_id: int
    public_key: bytes
    suites: tuple[tuple[int, int], ...] = ((KDF_HKDF_SHA256, AEAD_AES_128_GCM), (KDF_HKDF_SHA256, AEAD_CHACHA20_POLY1305))
    kem_id: int = KEM_X25519

    def encode(self) -> bytes:
        algs = b"".join(struct.pack(">HH", kdf, aead) for kdf, aead in self.suites)
        return struct.pack(">BH", self.key_id, self.kem_id) + self.public_key + struct.pack(">H", len(algs)) + algs

    @classmethod
    def parse(cls, data: bytes) -> KeyConfig:
        if len(data) < 3 + _NENC + 2:
            raise OhttpError("truncated key configuration")
        key_id, kem_id = struct.unpack(">BH", data[:3])
        if kem_id != KEM_X25519:
            raise OhttpError("unsupported KEM")
        public_key = data[3:3 + _NENC]
        (n,) = struct.unpack(">H", data[3 + _NENC:5 + _NENC])
        algs = data[5 + _NENC:]
        if n != len(algs) or n % 4 or n == 0:
            raise OhttpError("malformed key configuration")
        suites = tuple(struct.unpack(">HH", algs[i:i + 4]) for i in range(0, n, 4))
        return cls(key_id, public_key, suites, kem_id)


def encode_key_configs(configs: list[KeyConfig]) -> bytes:
    """application/ohttp-keys: each configuration prefixed by its 2-byte length (RFC 9458, 3.2)."""
    return b"".join(struct.pack(">H", len(c.encode())) + c.encode() for c in configs)


def parse_key_configs(data: bytes) -> list[KeyConfig]:
    out, pos = [], 0
    while pos < len(data):
        if pos + 2 > len(data):
            raise OhttpError("truncated key configuration list")
        (n,) = struct.unpack(">H", data[pos:pos + 2])
        if pos + 2 + n > len(data):
            raise OhttpError("truncated key configuration list")
        out.append(KeyConfig.parse(data[pos + 2:pos + 2 + n]))
        pos += 2 + n
    return out


def _suite(kdf_id: int, aead_id: int) -> CipherSuite:
    if kdf_id != KDF_HKDF_SHA256 or aead_id not in _AEADS:
        raise OhttpError("unsupported cipher suite")
    return CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, _AEADS[aead_id][0])


def _header(key_id: int, kdf_id: int, aead_id: int) -> bytes:
    return struct.pack(">BHHH", key_id, KEM_X25519, kdf_id, aead_id)


def _response_keys(secret: bytes, enc: bytes, nonce: bytes, aead_id: int) -> tuple[bytes, bytes]:
    _, _, nk, nn = _AEADS[aead_id]
    h = hmac.HMAC(enc + nonce, hashes.SHA256())  # HKDF-Extract(salt = enc || response_nonce, secret)
    h.update(secret)
    prk = h.finalize()
    key = HKDFExpand(hashes.SHA256(), nk, b"key").derive(prk)
    return key, HKDFExpand(hashes.SHA256(), nn, b"nonce").derive(prk)


@dataclass
class ResponseContext:
    """What answering one request needs: its HPKE exporter secret and enc."""
    secret: bytes
    enc: bytes
    aead_id: int

    def encapsulate(self, response: bytes, nonce: bytes | None = None) -> bytes:
        _, aead_cls, nk, nn = _AEADS[self.aead_id]
        nonce = nonce if nonce is not None else os.urandom(max(nk, nn))
        key, aead_nonce = _response_keys(self.secret, self.enc, nonce, self.aead_id)
        return nonce + aead_cls(key).encrypt(aead_nonce, response, b"")

    def decapsulate(self, enc_response: bytes) -> bytes:
        """The client's side of the same: open the gateway's answer."""
        _, aead_cls, nk, nn = _AEADS[self.aead_id]
        size = max(nk, nn)
        if len(enc_response) < size + 16:
            raise OhttpError("truncated encapsulated response")
        key, aead_nonce = _response_keys(self.secret, self.enc, enc_response[:size], self.aead_id)
        try:
            return aead_cls(key).decrypt(aead_nonce, enc_response[size:], b"")
        except Exception:
            raise OhttpError("the encapsulated response does not decrypt") from None


class GatewayKey:
    """One live key of the gateway: its id, X25519 private key and configuration."""

    def __init__(self, key_id: int, private_key: bytes | None = None) -> None:
        suite = _suite(KDF_HKDF_SHA256, AEAD_AES_128_GCM)
        secret = X25519PrivateKey.from_private_bytes(private_key) if private_key else X25519PrivateKey.generate()
        self.key_id = key_id
        self._private = suite.kem.deserialize_private_key(secret.private_bytes_raw())
        self.config = KeyConfig(key_id, secret.public_key().public_bytes_raw())


class Gateway:
    """Opens encapsulated requests addressed to any of its live keys."""

    def __init__(self, keys: list[GatewayKey]) -> None:
        self.keys = {k.key_id: k for k in keys}

    def key_configs(self) -> bytes:
        return encode_key_configs([k.config for k in self.keys.values()])

    def open_header(self, data: bytes, min_body: int) -> tuple[GatewayKey, int, CipherSuite]:
        """The key and suite a request header names (refusing what this gateway cannot open)."""
        if len(data) < 7 + _NENC + min_body:
            raise OhttpError("truncated encapsulated request")
        key_id, kem_id, kdf_id, aead_id = struct.unpack(">BHHH", data[:7])
        key = self.keys.get(key_id)
        if key is None:
            raise OhttpError("unknown key id")
        if kem_id != KEM_X25519 or (kdf_id, aead_id) not in key.config.suites:
            raise OhttpError("unsupported cipher suite")
        return key, aead_id, _suite(kdf_id, aead_id)

    def decapsulate(self, enc_request: bytes) -> tuple[bytes, ResponseContext]:
        key, aead_id, suite = self.open_header(enc_request, 16)
        hdr, enc, ct = enc_request[:7], enc_request[7:7 + _NENC], enc_request[7 + _NENC:]
        try:
            ctx = suite.create_recipient_context(enc, key._private, info=REQUEST_LABEL + b"\x00" + hdr)
            request = ctx.open(ct, aad=b"")
        except Exception:
            raise OhttpError("the encapsulated request does not decrypt") from None
        _, _, nk, nn = _AEADS[aead_id]
        return request, ResponseContext(ctx.export(RESPONSE_LABEL, max(nk, nn)), enc, aead_id)


def _client_suite(config: KeyConfig, aead_id: int | None) -> tuple[int, CipherSuite, bytes]:
    """The AEAD (asked for, or the gateway's first this client has), its suite, the request header."""
    aead_id = aead_id or next((a for k, a in config.suites if k == KDF_HKDF_SHA256 and a in _AEADS), None)
    if aead_id is None or (KDF_HKDF_SHA256, aead_id) not in config.suites:
        raise OhttpError("no cipher suite in common with the gateway")
    return aead_id, _suite(KDF_HKDF_SHA256, aead_id), _header(config.key_id, KDF_HKDF_SHA256, aead_id)


def encapsulate_request(config: KeyConfig, request: bytes, aead_id: int | None = None,
                        ephemeral_private_key: bytes | None = None) -> tuple[bytes, ResponseContext]:
    """The client's side: seal `request` to the gateway's configuration. Returns the encapsulated
    request and the context that opens the answer. (A fixed ephemeral key is for test vectors.)"""
    aead_id, suite, hdr = _client_suite(config, aead_id)
    eks = None
    if ephemeral_private_key is not None:
        public = X25519PrivateKey.from_private_bytes(ephemeral_private_key).public_key().public_bytes_raw()
        eks = KEMKeyPair(suite.kem.deserialize_private_key(ephemeral_private_key),
                         suite.kem.deserialize_public_key(public))
    try:
        enc, ctx = suite.create_sender_context(suite.kem.deserialize_public_key(config.public_key),
                                               info=REQUEST_LABEL + b"\x00" + hdr, eks=eks)
    except ValueError:  # a low-order or malformed X25519 key
        raise OhttpError("the gateway's public key is not usable") from None
    _, _, nk, nn = _AEADS[aead_id]
    return hdr + enc + ctx.seal(request, aad=b""), ResponseContext(ctx.export(RESPONSE_LABEL, max(nk, nn)), enc, aead_id)


# ---- Chunked Oblivious HTTP (draft-ietf-ohai-chunked-ohttp, the working group draft's labels
# "message/bhttp chunked request|response" and final-chunk AAD "final"): a request or response
# travels as length-prefixed sealed chunks, the last one after a zero length, so a streamed answer
# is readable chunk by chunk.

CHUNKED_REQUEST_MEDIA_TYPE, CHUNKED_RESPONSE_MEDIA_TYPE = "message/ohttp-chunked-req", "message/ohttp-chunked-res"
CHUNKED_REQUEST_LABEL, CHUNKED_RESPONSE_LABEL = b"message/bhttp chunked request", b"message/bhttp chunked response"
_FINAL = b"final"


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    if pos >= len(data):
        raise OhttpError("truncated chunk")
    size = 1 << (data[pos] >> 6)
    if pos + size > len(data):
        raise OhttpError("truncated chunk")
    return int.from_bytes(data[pos:pos + size], "big") & ((1 << (8 * size - 2)) - 1), pos + size


def _encode_varint(v: int) -> bytes:
    from llmserve.privacy.bhttp import encode_varint

    return encode_varint(v)


class ChunkedResponseSealer:
    """The gateway's side of a chunked response: the nonce first, then chunk after chunk."""

    def __init__(self, secret: bytes, enc: bytes, aead_id: int, nonce: bytes | None = None) -> None:
        _, aead_cls, nk, nn = _AEADS[aead_id]
        self.nonce = nonce if nonce is not None else os.urandom(max(nk, nn))
        key, self._base = _response_keys(secret, enc, self.nonce, aead_id)
        self._aead, self._nn, self._counter = aead_cls(key), nn, 0

    def _seal(self, chunk: bytes, aad: bytes) -> bytes:
        nonce = bytes(a ^ b for a, b in zip(self._base, self._counter.to_bytes(self._nn, "big")))
        self._counter += 1
        return self._aead.encrypt(nonce, chunk, aad)

    def chunk(self, data: bytes) -> bytes:
        sealed = self._seal(data, b"")
        return _encode_varint(len(sealed)) + sealed

    def final(self, data: bytes = b"") -> bytes:
        return b"\x00" + self._seal(data, _FINAL)


class ChunkedResponseOpener:
    """The client's side: feed bytes as they arrive, get each chunk's plaintext as soon as it is whole."""

    def __init__(self, secret: bytes, enc: bytes, aead_id: int) -> None:
        self._secret, self._enc, self._aead_id = secret, enc, aead_id
        _, self._aead_cls, nk, self._nn = _AEADS[aead_id]
        self._nonce_len = max(nk, self._nn)
        self._buf, self._aead, self._base, self._counter, self.done = b"", None, b"", 0, False

    def _open(self, sealed: bytes, aad: bytes) -> bytes:
        nonce = bytes(a ^ b for a, b in zip(self._base, self._counter.to_bytes(self._nn, "big")))
        self._counter += 1
        try:
            return self._aead.decrypt(nonce, sealed, aad)
        except Exception:
            raise OhttpError("a response chunk does not decrypt") from None

    def feed(self, data: bytes, end: bool = False) -> list[bytes]:
        """Plaintext chunks now complete; `end` says the stream ended (the final chunk is its rest)."""
        self._buf += data
        out = []
        if self._aead is None:
            if len(self._buf) < self._nonce_len:
                return out
            key, self._base = _response_keys(self._secret, self._enc, self._buf[:self._nonce_len], self._aead_id)
            self._aead, self._buf = self._aead_cls(key), self._buf[self._nonce_len:]
        while self._buf and not self.done:
            try:
                length, pos = _varint(self._buf, 0)
            except OhttpError:
                break  # the length itself is not all here yet
            if length == 0:
                if not end:
                    break  # the final chunk runs to the end of the stream
                out.append(self._open(self._buf[pos:], _FINAL))
                self._buf, self.done = b"", True
                break
            if pos + length > len(self._buf):
                break
            out.append(self._open(self._buf[pos:pos + length], b""))
            self._buf = self._buf[pos + length:]
        if end and not self.done:
            raise OhttpError("the response ended without its final chunk")
        return out


def encapsulate_chunked_request(config: KeyConfig, chunks: list[bytes], aead_id: int | None = None,
                                ) -> tuple[bytes, ChunkedResponseOpener]:
    """The client's side of a chunked request (all chunks at once here: requests are small)."""
    aead_id, suite, hdr = _client_suite(config, aead_id)
    try:
        enc, ctx = suite.create_sender_context(suite.kem.deserialize_public_key(config.public_key),
                                               info=CHUNKED_REQUEST_LABEL + b"\x00" + hdr)
    except ValueError:
        raise OhttpError("the gateway's public key is not usable") from None
    body = b""
    for chunk in chunks[:-1]:
        sealed = ctx.seal(chunk, aad=b"")
        body += _encode_varint(len(sealed)) + sealed
    body += b"\x00" + ctx.seal(chunks[-1] if chunks else b"", aad=_FINAL)
    _, _, nk, nn = _AEADS[aead_id]
    return hdr + enc + body, ChunkedResponseOpener(ctx.export(CHUNKED_RESPONSE_LABEL, max(nk, nn)), enc, aead_id)


def decapsulate_chunked_request(gateway: Gateway, data: bytes) -> tuple[bytes, ChunkedResponseSealer]:
    """The gateway's side: a whole chunked request in, its plaintext and the response sealer out."""
    key, aead_id, suite = gateway.open_header(data, 1)
    enc, pos = data[7:7 + _NENC], 7 + _NENC
    try:
        ctx = suite.create_recipient_context(enc, key._private, info=CHUNKED_REQUEST_LABEL + b"\x00" + data[:7])
    except Exception:
        raise OhttpError("the encapsulated request does not decrypt") from None
    plain = b""
    while True:
        length, pos = _varint(data, pos)
        try:
            if length == 0:
                plain += ctx.open(data[pos:], aad=_FINAL)
                break
            if pos + length > len(data):
                raise OhttpError("truncated chunk")
            plain += ctx.open(data[pos:pos + length], aad=b"")
        except OhttpError:
            raise
        except Exception:
            raise OhttpError("the encapsulated request does not decrypt") from None
        pos += length
    _, _, nk, nn = _AEADS[aead_id]
    return plain, ChunkedResponseSealer(ctx.export(CHUNKED_RESPONSE_LABEL, max(nk, nn)), enc, aead_id)
