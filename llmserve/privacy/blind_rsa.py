"""RSA blind signatures (RFC 9474): RSABSSA-SHA384-PSS-Randomized and RSABSSA-SHA384-PSS-Deterministic.

No maintained PyPI package implements them, so they are written here over `cryptography`'s RSA keys
(key generation, and the final signature check is its RSASSA-PSS verification) and Python
integers, and tested against the RFC's Appendix A vectors.

  client: prepare (Randomized: a 32-byte random prefix), EMSA-PSS-encode (SHA-384, MGF1-SHA-384,
          48-byte salt), blind with a random r: z = m * r^e mod n
  issuer: s' = z^d mod n, checked by re-encryption before it leaves (a fault must not leak the key)
  client: s = s' * r^-1 mod n, then an ordinary RSASSA-PSS verification of s over the prepared message

Side channels: Python's big integers are not constant-time, so `pow` with the private exponent leaks
timing to an attacker who can measure the issuer precisely; blinding the issuer's own exponentiation
(a random multiple of the message, removed after) bounds what such timing can learn. The client's
blinding secret r never leaves it. An issuer exposed to fine-grained timing should use an
implementation in constant-time C.
"""
from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

HASH_LEN = SALT_LEN = 48  # SHA-384
PREFIX_LEN = 32


class BlindRsaError(ValueError):
    """A message or signature that fails a check of RFC 9474 (never any content in the message)."""


def _i2osp(x: int, length: int) -> bytes:
    return x.to_bytes(length, "big")


def _os2ip(b: bytes) -> int:
    return int.from_bytes(b, "big")


def _mgf1(seed: bytes, length: int) -> bytes:
    out = b"".join(hashlib.sha384(seed + _i2osp(i, 4)).digest() for i in range(math.ceil(length / HASH_LEN)))
    return out[:length]


def emsa_pss_encode(msg: bytes, em_bits: int, salt: bytes) -> bytes:
    """RFC 8017, 9.1.1, with SHA-384 and MGF1-SHA-384."""
    em_len = math.ceil(em_bits / 8)
    m_hash = hashlib.sha384(msg).digest()
    if em_len < HASH_LEN + len(salt) + 2:
        raise BlindRsaError("encoding error: the key is too small")
    h = hashlib.sha384(b"\x00" * 8 + m_hash + salt).digest()
    db = b"\x00" * (em_len - len(salt) - HASH_LEN - 2) + b"\x01" + salt
    masked = bytes(a ^ b for a, b in zip(db, _mgf1(h, em_len - HASH_LEN - 1)))
    masked = bytes([masked[0] & (0xFF >> (8 * em_len - em_bits))]) + masked[1:]
    return masked + h + b"\xbc"


@dataclass(frozen=True)
class Variant:
    name: str
    randomized: bool  # a random prefix makes the signed message unique even for equal inputs


PSS_RANDOMIZED = Variant("RSABSSA-SHA384-PSS-Randomized", True)
PSS_DETERMINISTIC = Variant("RSABSSA-SHA384-PSS-Deterministic", False)


@dataclass(frozen=True)
class Blinded:
    blinded_msg: bytes  # sent to the issuer
    inv: int  # r^-1 mod n: kept by the client to finalize
    prepared_msg: bytes  # what the final signature signs (prefix || msg for the randomized variant)


def _modulus_len(pk: rsa.RSAPublicKey) -> int:
    return math.ceil(pk.key_size / 8)


def blind(pk: rsa.RSAPublicKey, msg: bytes, variant: Variant = PSS_RANDOMIZED, *, prefix: bytes | None = None,
          salt: bytes | None = None, r: int | None = None) -> Blinded:
    """The client's first step. prefix, salt and r are for test vectors; by default they are random."""
    numbers = pk.public_numbers()
    n, e = numbers.n, numbers.e
    if variant.randomized:
        prefix = prefix if prefix is not None else secrets.token_bytes(PREFIX_LEN)
        prepared = prefix + msg
    else:
        prepared = msg
    encoded = emsa_pss_encode(prepared, pk.key_size - 1, salt if salt is not None else secrets.token_bytes(SALT_LEN))
    m = _os2ip(encoded)
    if math.gcd(m, n) != 1:
        raise BlindRsaError("invalid input: the encoded message is not invertible")
    while r is None:
        candidate = secrets.randbelow(n - 1) + 1
        if math.gcd(candidate, n) == 1:
            r = candidate
    inv = pow(r, -1, n)
    z = (m * pow(r, e, n)) % n
    return Blinded(_i2osp(z, _modulus_len(pk)), inv, prepared)


def blind_sign(sk: rsa.RSAPrivateKey, blinded_msg: bytes) -> bytes:
    """The issuer's step: sign a blinded message without learning what it hides."""
    numbers = sk.private_numbers()
    n, e, d = numbers.public_numbers.n, numbers.public_numbers.e, numbers.d
    k = _modulus_len(sk.public_key())
    if len(blinded_msg) != k:
        raise BlindRsaError("blinded message of the wrong length")
    m = _os2ip(blinded_msg)
    if m >= n:
        raise BlindRsaError("blinded message out of range")
    # Exponent blinding: m^d computed as (m * u^e)^d * u^-1, so timing depends on a fresh u.
    u = secrets.randbelow(n - 2) + 2
    while math.gcd(u, n) != 1:
        u = secrets.randbelow(n - 2) + 2
    s = (pow((m * pow(u, e, n)) % n, d, n) * pow(u, -1, n)) % n
    if pow(s, e, n) != m:  # a fault (or a bug) must not put a wrong signature, which leaks the key, on the wire
        raise BlindRsaError("signing failure")
    return _i2osp(s, k)


def finalize(pk: rsa.RSAPublicKey, blinded: Blinded, blind_sig: bytes) -> bytes:
    """The client's last step: unblind, then check the signature as any RSASSA-PSS verifier would."""
    k = _modulus_len(pk)
    if len(blind_sig) != k:
        raise BlindRsaError("blind signature of the wrong length")
    n = pk.public_numbers().n
    sig = _i2osp((_os2ip(blind_sig) * blinded.inv) % n, k)
    verify(pk, blinded.prepared_msg, sig)
    return sig


def verify(pk: rsa.RSAPublicKey, prepared_msg: bytes, sig: bytes) -> None:
    try:
        pk.verify(sig, prepared_msg, padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=SALT_LEN),
                  hashes.SHA384())
    except InvalidSignature:
        raise BlindRsaError("invalid signature") from None


def private_key_from(p: int, q: int, e: int = 65537) -> rsa.RSAPrivateKey:
    """An RSA private key from its primes (as the RFC's vectors give it)."""
    n, d = p * q, pow(e, -1, math.lcm(p - 1, q - 1))
    numbers = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), rsa.RSAPublicNumbers(e, n))
    return numbers.private_key()
