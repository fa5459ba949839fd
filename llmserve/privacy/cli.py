"""`llmserve manifest | relay | issuer`, and `llmserve chat --private URL`: the operator's and the
client's side of private mode."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_privacy_parsers(sub) -> None:
    from llmserve.cli import add_engine_args

    manifest = sub.add_parser("manifest", help="signed manifests of what a private node runs")
    msub = manifest.add_subparsers(dest="manifest_command", required=True)
    keygen = msub.add_parser("keygen", help="a P-256 signing key pair for manifests")
    keygen.add_argument("--out", required=True, help="folder for manifest-key.pem (private) and manifest-key.pub")
    keygen.set_defaults(func=_keygen)
    build = msub.add_parser("build", help="measure the package, model and config; sign; append to the log")
    build.add_argument("model", nargs="?", default=None)
    add_engine_args(build)
    build.add_argument("--key", required=True, help="the private signing key (PEM)")
    build.add_argument("--out", required=True, help="folder for manifest.json and manifest.sig (serve --manifest)")
    build.add_argument("--log", default=None, help="the transparency log folder to append the release to")
    build.set_defaults(func=_build)

    relay = sub.add_parser("relay", help="an Oblivious HTTP relay in front of one gateway")
    relay.add_argument("--gateway", required=True, help="the gateway's URL (…/.well-known/ohttp-gateway)")
    relay.add_argument("--host", default="127.0.0.1")
    relay.add_argument("--port", type=int, default=8100)
    relay.set_defaults(func=_relay)

    issuer = sub.add_parser("issuer", help="a Privacy Pass issuer (token type 0x0002)")
    issuer.add_argument("--key", required=True, help="the issuer's RSA-2048 private key (PEM; created if missing)")
    issuer.add_argument("--name", default="llmserve-issuer")
    issuer.add_argument("--rate", type=int, default=100, help="tokens per attester per --per seconds")
    issuer.add_argument("--per", type=float, default=3600.0)
    issuer.add_argument("--host", default="127.0.0.1")
    issuer.add_argument("--port", type=int, default=8200)
    issuer.set_defaults(func=_issuer)


def add_private_chat_args(chat: argparse.ArgumentParser) -> None:
    chat.add_argument("--private", default=None, metavar="URL",
                      help="chat with a private node at URL: verify it (--manifest-key, --log), then talk "
                           "through Oblivious HTTP (--relay) with Privacy Pass tokens (--issuer)")
    chat.add_argument("--manifest-key", default=None, help="(--private) the operator's manifest public key (PEM)")
    chat.add_argument("--log", default=None, help="(--private) the operator's transparency log folder")
    chat.add_argument("--relay", default=None, help="(--private) an Oblivious HTTP relay URL (default: the gateway)")
    chat.add_argument("--issuer", default=None, help="(--private) a Privacy Pass issuer URL, when the node wants tokens")
    chat.add_argument("--attester-token", default=None, help="(--private) the credential the issuer rate-limits")


def _keygen(args: argparse.Namespace) -> None:
    from llmserve.privacy.manifest import generate_key

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    generate_key(out / "manifest-key.pem", out / "manifest-key.pub")
    print(f"wrote {out / 'manifest-key.pem'} (keep it private) and {out / 'manifest-key.pub'}")


def _build(args: argparse.Namespace) -> None:
    from llmserve.cli import engine_kwargs
    from llmserve.config import EngineConfig
    from llmserve.model.default_model import default_model_path
    from llmserve.model.resolve import resolve_model_folder
    from llmserve.privacy.manifest import build_manifest, sign_manifest
    from llmserve.privacy.threats import private_config
    from llmserve.privacy.translog import TransparencyLog

    config = private_config(EngineConfig(**engine_kwargs(args)))
    frozen = {**json.loads(json.dumps(config.__dict__, default=str)), "seed": "random at every start"}
    model = config.model
    source = Path(model) if model and Path(model).is_file() else (None if model else default_model_path())
    manifest = build_manifest(frozen, resolve_model_folder(model), source)
    sign_manifest(manifest, Path(args.key), Path(args.out))
    print(f"signed manifest in {args.out}")
    if args.log:
        print(f"appended as entry {TransparencyLog(args.log).append(manifest)} of {args.log}")


def _relay(args: argparse.Namespace) -> None:
    import uvicorn

    from llmserve.privacy.relay import build_relay

    # No access log: a relay's whole point is to keep client addresses to itself.
    uvicorn.run(build_relay(args.gateway), host=args.host, port=args.port, access_log=False, log_level="warning")


def _issuer(args: argparse.Namespace) -> None:
    import uvicorn
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from llmserve.privacy.issuer_app import build_issuer_app
    from llmserve.privacy.privacypass import Issuer

    path = Path(args.key)
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        path.touch(mode=0o600)
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.with_suffix(".pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        print(f"new issuer key {path}; give the server {path.with_suffix('.pub')} (--token-issuer-key)")
    issuer = Issuer(args.name, key, rate=args.rate, per_s=args.per)
    uvicorn.run(build_issuer_app(issuer), host=args.host, port=args.port, access_log=False, log_level="warning")


def private_chat(args: argparse.Namespace) -> None:
    """Verify the node, then one streamed chat turn through Oblivious HTTP."""
    import httpx

    from llmserve.privacy.client import ObliviousClient
    from llmserve.privacy.gateway import WELL_KNOWN
    from llmserve.privacy.verify import verify_node

    url = args.private.rstrip("/")
    if not (args.manifest_key and args.log):
        sys.exit("error: --private needs --manifest-key and --log: the node is verified before anything is sent")
    verify_node(url, args.log, Path(args.manifest_key))
    keys_url = url + WELL_KNOWN
    client = ObliviousClient(args.relay or keys_url, ObliviousClient.fetch_keys(keys_url))
    headers = {}
    challenge = httpx.get(url + "/v1/privacy").json().get("token_challenge")
    if challenge:
        if not args.issuer:
            sys.exit("error: the node requires Privacy Pass tokens: give --issuer")
        headers["authorization"] = fetch_token(args.issuer, challenge, args.attester_token)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.question}]
    body = json.dumps({"messages": messages, "max_tokens": args.max_tokens, "temperature": args.temperature,
                       "stream": True}).encode()
    for item in client.stream("POST", "/v1/chat/completions", body, headers):
        if isinstance(item, tuple):
            if item[0] != 200:
                sys.exit(f"error: the node answered {item[0]}")
            continue
        for line in item.decode().splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                print(delta or "", end="", flush=True)
    print()


def fetch_token(issuer_url: str, challenge_b64: str, attester_token: str | None) -> str:
    """One token for the node's challenge (as GET /v1/privacy gives it), from the issuer."""
    import httpx

    from llmserve.privacy.privacypass import (
        authorization_header,
        create_token_request,
        finalize_token,
        unb64url,
    )
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    directory = httpx.get(issuer_url.rstrip("/") + "/.well-known/private-token-issuer-directory").json()
    spki = unb64url(directory["token-keys"][0]["token-key"])
    pk = load_der_public_key(_rsa_spki(spki))
    state = create_token_request(unb64url(challenge_b64), pk)
    answer = httpx.post(issuer_url.rstrip("/") + directory["issuer-request-uri"], content=state.request,
                        headers={"content-type": "application/private-token-request",
                                 **({"authorization": f"Bearer {attester_token}"} if attester_token else {})})
    answer.raise_for_status()
    return authorization_header(finalize_token(state, pk, answer.content))


def _rsa_spki(pss_spki: bytes) -> bytes:
    """The issuer key's RSASSA-PSS SubjectPublicKeyInfo re-labelled rsaEncryption, which every
    loader reads (the key bits are the same)."""
    from llmserve.privacy.privacypass import _PSS_ALGORITHM, _der_length

    rsa_algorithm = bytes.fromhex("300d06092a864886f70d0101010500")
    inner = pss_spki[pss_spki.index(_PSS_ALGORITHM) + len(_PSS_ALGORITHM):]
    body = rsa_algorithm + inner
    return b"\x30" + _der_length(len(body)) + body
