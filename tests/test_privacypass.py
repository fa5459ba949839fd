"""Privacy Pass publicly verifiable tokens (type 0x0002) and the PrivateToken scheme: the issuance
protocol's published test vector, then the properties the server relies on (one use, one issuer,
no forgery, a rate limit, unlinkability)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from llmserve.privacy import blind_rsa
from llmserve.privacy.privacypass import (
    Issuer,
    Token,
    TokenChallenge,
    TokenError,
    TokenRedeemer,
    authorization_header,
    create_token_request,
    finalize_token,
    public_key_spki,
    token_key_id,
)

V = json.loads((Path(__file__).parent / "vectors" / "privacypass_type2.json").read_text())


def test_issuance_vector():
    sk = serialization.load_pem_private_key(bytes.fromhex(V["skS"]), password=None)
    pk = sk.public_key()
    assert public_key_spki(pk).hex() == V["pkS"]  # the RSASSA-PSS SubjectPublicKeyInfo, byte for byte
    token = bytes.fromhex(V["token"])
    assert token[66:98] == token_key_id(pk)
    challenge_digest = token[34:66]
    token_input = token[:98]
    assert token_input[2:34].hex() == V["nonce"]
    salt, r = bytes.fromhex(V["salt"]), int(V["blind"], 16)
    blinded = blind_rsa.blind(pk, token_input, blind_rsa.PSS_DETERMINISTIC, salt=salt, r=r)
    request = bytes.fromhex(V["token_request"])
    assert blinded.blinded_msg == request[3:]
    assert blind_rsa.blind_sign(sk, blinded.blinded_msg).hex() == V["token_response"]
    assert blind_rsa.finalize(pk, blinded, bytes.fromhex(V["token_response"])) == token[98:]
    assert Token.decode(token).encode() == token and len(challenge_digest) == 32


@pytest.fixture(scope="module")
def issuer():
    return Issuer("issuer.example", rate=3, per_s=3600)


def _token(issuer, challenge, attester="attester-1"):
    state = create_token_request(challenge, issuer.public_key)
    return finalize_token(state, issuer.public_key, issuer.issue(state.request, attester)), state


def test_a_token_is_accepted_once(issuer):
    challenge = TokenChallenge("issuer.example", origin_info=("llm.example",))
    redeemer = TokenRedeemer([issuer.public_key], challenge)
    assert redeemer.challenge_header().startswith('PrivateToken challenge="')
    token, _ = _token(issuer, challenge)
    redeemer.redeem(authorization_header(token))
    with pytest.raises(TokenError, match="already spent"):
        redeemer.redeem(authorization_header(token))
    with pytest.raises(TokenError, match="no PrivateToken"):
        redeemer.redeem(None)


def test_other_issuers_forgeries_and_other_challenges_are_refused(issuer):
    challenge = TokenChallenge("issuer.example")
    redeemer = TokenRedeemer([issuer.public_key], challenge)
    other = Issuer("other.example")
    foreign, _ = _token(other, challenge)
    with pytest.raises(TokenError, match="unknown issuer key"):
        redeemer.redeem(authorization_header(foreign))
    good, _ = _token(issuer, challenge)
    forged = Token(good.nonce, good.challenge_digest, good.token_key_id, bytes(256))
    with pytest.raises(TokenError, match="forged"):
        redeemer.redeem(authorization_header(forged))
    elsewhere, _ = _token(issuer, TokenChallenge("issuer.example", origin_info=("other.example",)))
    with pytest.raises(TokenError, match="another challenge"):
        redeemer.redeem(authorization_header(elsewhere))


def test_issuance_is_rate_limited_per_attester_and_unlinkable():
    issuer = Issuer("issuer.example", rate=2, per_s=3600)
    challenge = TokenChallenge("issuer.example")
    seen_by_issuer, redeemed = [], []
    for _ in range(2):
        token, state = _token(issuer, challenge, attester="a")
        seen_by_issuer.append(state.request)
        redeemed.append(token.encode())
    with pytest.raises(TokenError, match="rate limit"):
        _token(issuer, challenge, attester="a")
    _token(issuer, challenge, attester="b")  # another attester has its own budget
    # The issuer's view (blinded requests) and the server's (tokens) share no value: no 16-byte
    # window of a redeemed token's nonce or authenticator appears in any request the issuer saw.
    for token in redeemed:
        secret_parts = token[2:34] + token[98:]
        windows = {secret_parts[i:i + 16] for i in range(len(secret_parts) - 15)}
        assert not any(w in request for w in windows for request in seen_by_issuer)
    with pytest.raises(TokenError, match="another issuer key"):
        Issuer("x").issue(seen_by_issuer[0], "a")
