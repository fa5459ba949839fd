"""RSA blind signatures (RFC 9474) against the RFC's Appendix A vectors for both variants this code
claims, and the properties a token issuer relies on."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from llmserve.privacy import blind_rsa
from llmserve.privacy.blind_rsa import PSS_DETERMINISTIC, PSS_RANDOMIZED, BlindRsaError

V = json.loads((Path(__file__).parent / "vectors" / "rfc9474.json").read_text())
SK = blind_rsa.private_key_from(int(V["p"], 16), int(V["q"], 16), int(V["e"], 16))
PK = SK.public_key()


@pytest.mark.parametrize("variant", [PSS_RANDOMIZED, PSS_DETERMINISTIC], ids=lambda v: v.name)
def test_appendix_a_vectors(variant):
    tv = V[variant.name]
    msg, salt = bytes.fromhex(V["msg"]), bytes.fromhex(V["salt"])
    prefix = bytes.fromhex(tv["msg_prefix"]) if variant.randomized else None
    prepared = (prefix or b"") + msg
    assert blind_rsa.emsa_pss_encode(prepared, PK.key_size - 1, salt).hex() == tv["encoded_msg"]
    n = PK.public_numbers().n
    blinded = blind_rsa.blind(PK, msg, variant, prefix=prefix, salt=salt, r=pow(int(V["inv"], 16), -1, n))
    assert blinded.blinded_msg.hex() == tv["blinded_msg"]
    assert blind_rsa.blind_sign(SK, blinded.blinded_msg).hex() == tv["blind_sig"]
    assert blind_rsa.finalize(PK, blinded, bytes.fromhex(tv["blind_sig"])).hex() == tv["sig"]
    blind_rsa.verify(PK, prepared, bytes.fromhex(tv["sig"]))


def test_fresh_blinding_is_unlinkable_and_wrong_inputs_fail():
    sk = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pk = sk.public_key()
    a, b = blind_rsa.blind(pk, b"token"), blind_rsa.blind(pk, b"token")
    assert a.blinded_msg != b.blinded_msg  # the issuer sees unrelated values for one message
    sig_a = blind_rsa.finalize(pk, a, blind_rsa.blind_sign(sk, a.blinded_msg))
    sig_b = blind_rsa.finalize(pk, b, blind_rsa.blind_sign(sk, b.blinded_msg))
    assert sig_a != sig_b and a.prepared_msg != b.prepared_msg  # randomized: distinct signed messages
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    theirs = blind_rsa.blind_sign(other, blind_rsa.blind(other.public_key(), b"token").blinded_msg)
    with pytest.raises(BlindRsaError, match="invalid signature"):
        blind_rsa.finalize(pk, a, theirs)  # a signature from another issuer's key
    with pytest.raises(BlindRsaError, match="invalid signature"):
        blind_rsa.verify(pk, a.prepared_msg + b"x", sig_a)
    with pytest.raises(BlindRsaError, match="wrong length"):
        blind_rsa.blind_sign(sk, a.blinded_msg[1:])
    with pytest.raises(BlindRsaError, match="out of range"):
        blind_rsa.blind_sign(sk, b"\xff" * len(a.blinded_msg))
