"""Anonymous one-time tokens: Privacy Pass publicly verifiable tokens (RFC 9578, token type
0x0002, blind RSA 2048 with RSABSSA-SHA384-PSS-Deterministic) and the PrivateToken HTTP
authentication scheme (RFC 9577).

An issuer signs blinded token requests (rate-limited per attester, the party that vouches for the
client); the server in private mode then accepts each token once. The issuer sees only blinded
messages and the server only finished tokens, so the two views share no value: a token cannot be
linked to its issuance.
"""
from __future__ import annotations

import base64
import hashlib
import secrets
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from llmserve.privacy import blind_rsa
from llmserve.privacy.blind_rsa import PSS_DETERMINISTIC, Blinded, BlindRsaError

TOKEN_TYPE = 0x0002
NK = 256  # bytes of a 2048-bit modulus
REQUEST_MEDIA_TYPE, RESPONSE_MEDIA_TYPE = "application/private-token-request", "application/private-token-response"
# AlgorithmIdentifier of id-RSASSA-PSS with SHA-384, MGF1-SHA-384 and a 48-byte salt (RFC 9578, 6.5):
# the issuer key is published as a SubjectPublicKeyInfo under it, and token_key_id is its SHA-256.
_PSS_ALGORITHM = bytes.fromhex("304106092a864886f70d01010a3034a00f300d06096086480165030402020500a11c301a06092a"
                               "864886f70d010108300d06096086480165030402020500a203020130")


class TokenError(ValueError):
    """A token or token message that fails a check (the message names the check, never a value)."""


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def public_key_spki(pk: rsa.RSAPublicKey) -> bytes:
    rsa_key = pk.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    bit_string = b"\x03" + _der_length(len(rsa_key) + 1) + b"\x00" + rsa_key
    body = _PSS_ALGORITHM + bit_string
    return b"\x30" + _der_length(len(body)) + body


def token_key_id(pk: rsa.RSAPublicKey) -> bytes:
    return hashlib.sha256(public_key_spki(pk)).digest()


def b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def unb64url(s: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    except (ValueError, TypeError):
        raise TokenError("not base64url") from None


@dataclass(frozen=True)
class TokenChallenge:
    issuer_name: str
    redemption_context: bytes = b""  # empty or 32 bytes
    origin_info: tuple[str, ...] = ()
    token_type: int = TOKEN_TYPE

    def encode(self) -> bytes:
        issuer, origins = self.issuer_name.encode(), ",".join(self.origin_info).encode()
        if len(self.redemption_context) not in (0, 32):
            raise TokenError("redemption_context must be empty or 32 bytes")
        return (struct.pack(">HH", self.token_type, len(issuer)) + issuer + bytes([len(self.redemption_context)])
                + self.redemption_context + struct.pack(">H", len(origins)) + origins)

    def header(self, pk: rsa.RSAPublicKey) -> str:
        """A WWW-Authenticate value (RFC 9577, 2.1)."""
        return f'PrivateToken challenge="{b64url(self.encode())}", token-key="{b64url(public_key_spki(pk))}"'


@dataclass(frozen=True)
class Token:
    nonce: bytes
    challenge_digest: bytes
    token_key_id: bytes
    authenticator: bytes
    token_type: int = TOKEN_TYPE

    def token_input(self) -> bytes:
        return struct.pack(">H", self.token_type) + self.nonce + self.challenge_digest + self.token_key_id

    def encode(self) -> bytes:
        return self.token_input() + self.authenticator

    @classmethod
    def decode(cls, data: bytes) -> Token:
        if len(data) != 2 + 32 + 32 + 32 + NK:
            raise TokenError("token of the wrong length")
        (token_type,) = struct.unpack(">H", data[:2])
        if token_type != TOKEN_TYPE:
            raise TokenError("unsupported token type")
        return cls(data[2:34], data[34:66], data[66:98], data[98:])


@dataclass
class TokenRequestState:
    """What the client keeps between its request and the issuer's response."""
    token_input: bytes
    blinded: Blinded
    request: bytes


def create_token_request(challenge: TokenChallenge | bytes, pk: rsa.RSAPublicKey, *, nonce: bytes | None = None,
                         salt: bytes | None = None, r: int | None = None) -> TokenRequestState:
    """RFC 9578, 6.1, for a challenge (or its encoded bytes, as a server sent them). (nonce, salt
    and r are for test vectors.)"""
    key_id = token_key_id(pk)
    nonce = nonce if nonce is not None else secrets.token_bytes(32)
    encoded = challenge if isinstance(challenge, bytes) else challenge.encode()
    token_input = struct.pack(">H", TOKEN_TYPE) + nonce + hashlib.sha256(encoded).digest() + key_id
    blinded = blind_rsa.blind(pk, token_input, PSS_DETERMINISTIC, salt=salt, r=r)
    # truncated_token_key_id: the least significant byte of token_key_id
    request = struct.pack(">HB", TOKEN_TYPE, key_id[-1]) + blinded.blinded_msg
    return TokenRequestState(token_input, blinded, request)


def finalize_token(state: TokenRequestState, pk: rsa.RSAPublicKey, response: bytes) -> Token:
    """RFC 9578, 6.3: unblind the issuer's response into a token (checked before it is kept)."""
    try:
        authenticator = blind_rsa.finalize(pk, state.blinded, response)
    except BlindRsaError as e:
        raise TokenError(f"the issuer's response is not a valid signature ({e})") from None
    return Token.decode(state.token_input + authenticator)


class Issuer:
    """Signs token requests; at most `rate` issuances per attester per `per_s` seconds."""

    def __init__(self, name: str, key: rsa.RSAPrivateKey | None = None, rate: int = 100, per_s: float = 3600.0) -> None:
        self.name = name
        self.key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if self.key.key_size != 2048:
            raise TokenError("token type 0x0002 needs a 2048-bit issuer key")
        self.rate, self.per_s = rate, per_s
        self._issued: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        return self.key.public_key()

    def issue(self, request: bytes, attester: str) -> bytes:
        if len(request) != 3 + NK:
            raise TokenError("token request of the wrong length")
        token_type, truncated = struct.unpack(">HB", request[:3])
        if token_type != TOKEN_TYPE:
            raise TokenError("unsupported token type")
        if truncated != token_key_id(self.public_key)[-1]:
            raise TokenError("token request for another issuer key")
        now = time.monotonic()
        with self._lock:
            times = self._issued.setdefault(attester, deque())
            while times and now - times[0] > self.per_s:
                times.popleft()
            if len(times) >= self.rate:
                raise TokenError("issuance rate limit reached for this attester")
            times.append(now)
        return blind_rsa.blind_sign(self.key, request[3:])


@dataclass
class TokenRedeemer:
    """The server's side in private mode: one valid, unspent token per request."""
    issuer_keys: list[rsa.RSAPublicKey]
    challenge: TokenChallenge
    expiry_s: float = 3600.0
    _spent: dict[bytes, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def challenge_header(self) -> str:
        return self.challenge.header(self.issuer_keys[0])

    def redeem(self, authorization: str | None) -> None:
        """Raise TokenError unless `authorization` carries a valid token not seen before."""
        token = Token.decode(unb64url(_token_param(authorization)))
        if token.challenge_digest != hashlib.sha256(self.challenge.encode()).digest():
            raise TokenError("token for another challenge")
        key = next((k for k in self.issuer_keys if token_key_id(k) == token.token_key_id), None)
        if key is None:
            raise TokenError("token from an unknown issuer key")
        try:
            blind_rsa.verify(key, token.token_input(), token.authenticator)
        except BlindRsaError:
            raise TokenError("forged token") from None
        now = time.monotonic()
        with self._lock:
            for nonce, at in list(self._spent.items()):
                if now - at > self.expiry_s:
                    del self._spent[nonce]
            if token.nonce in self._spent:
                raise TokenError("token already spent")
            self._spent[token.nonce] = now


def authorization_header(token: Token) -> str:
    return f'PrivateToken token="{b64url(token.encode())}"'


def _token_param(authorization: str | None) -> str:
    if not authorization or not authorization.startswith("PrivateToken "):
        raise TokenError("no PrivateToken authorization")
    for part in authorization[len("PrivateToken "):].split(","):
        name, _, value = part.strip().partition("=")
        if name == "token" and value:
            return value.strip('"')
    raise TokenError("no token parameter")
