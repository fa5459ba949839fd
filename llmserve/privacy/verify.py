"""Before a client sends a prompt: is the node running a released, logged build?

A node in private mode serves (GET /v1/privacy/manifest) its signed manifest, its inclusion proof
in the operator's transparency log, and a fresh measurement of its files. `verify_node` checks, in
order: the signature (the operator's public key), inclusion in the log's published checkpoint, that
the checkpoint extends the one the client pinned earlier (a rewritten log fails), and that the
measurement equals the manifest. Any failure raises NodeVerificationError naming the check; the
client then sends nothing. manifest.py says what this can and cannot prove.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmserve.privacy import merkle
from llmserve.privacy.manifest import ManifestError, measure, verify_signature
from llmserve.privacy.translog import Checkpoint, TransparencyLog, manifest_leaf


class NodeVerificationError(Exception):
    """The node failed a check; the message names it (never any request content)."""


@dataclass(frozen=True)
class NodeVerification:
    manifest_sha256: str
    log_index: int
    checkpoint: Checkpoint  # pin it: the next verification checks the log only grew from here


def node_document(manifest_dir: Path, model_folder: Path, model_source: Path | None,
                  log: TransparencyLog | None) -> dict[str, Any]:
    """What a node serves at GET /v1/privacy/manifest: measured now, proof from the log now."""
    manifest = (Path(manifest_dir) / "manifest.json").read_bytes()
    doc: dict[str, Any] = {"manifest": manifest.decode(), "signature": (Path(manifest_dir) / "manifest.sig").read_text(),
                           "measured": measure(model_folder, model_source)}
    index = log.index_of(manifest) if log is not None else None
    if index is not None:
        checkpoint = log.published_checkpoint()
        doc["log"] = {"index": index, **checkpoint.to_json(),
                      "proof": [p.hex() for p in log.inclusion_proof(index, checkpoint.size)]}
    return doc


def verify_document(doc: dict[str, Any], log: TransparencyLog | str | Path, public_key: Path | bytes,
                    pinned: Checkpoint | None = None) -> NodeVerification:
    log = log if isinstance(log, TransparencyLog) else TransparencyLog(log)
    try:
        manifest = doc["manifest"].encode()
        signature, measured = doc["signature"], doc["measured"]
    except (KeyError, TypeError, AttributeError):
        raise NodeVerificationError("the node's privacy document is malformed") from None
    try:
        verify_signature(manifest, signature, public_key)
    except ManifestError as e:
        raise NodeVerificationError(str(e)) from None
    checkpoint = log.published_checkpoint()
    entry = doc.get("log")
    if not isinstance(entry, dict):
        raise NodeVerificationError("the node gave no inclusion proof: its manifest is not in a transparency log")
    try:
        index, proof = int(entry["index"]), [bytes.fromhex(p) for p in entry["proof"]]
    except (KeyError, TypeError, ValueError):
        raise NodeVerificationError("the node's inclusion proof is malformed") from None
    if not merkle.verify_inclusion(index, checkpoint.size, manifest_leaf(manifest), proof, checkpoint.root):
        raise NodeVerificationError("the node's manifest is not included in the log's published checkpoint")
    if pinned is not None:
        if pinned.size > checkpoint.size:
            raise NodeVerificationError("the log is smaller than the checkpoint pinned before: it was rewritten")
        consistency = log.consistency_proof(pinned.size, checkpoint.size) if pinned.size else []
        if pinned.size and not merkle.verify_consistency(pinned.size, checkpoint.size, consistency, pinned.root,
                                                         checkpoint.root):
            raise NodeVerificationError("the log does not extend the checkpoint pinned before: it was rewritten")
    try:
        expected = json.loads(manifest)["files"]
    except (ValueError, KeyError, TypeError):
        raise NodeVerificationError("the signed manifest lists no files") from None
    if measured != expected:
        changed = sum(1 for k in set(expected) | set(measured) if expected.get(k) != measured.get(k))
        raise NodeVerificationError(f"{changed} of the node's files no longer hash to its manifest")
    return NodeVerification(hashlib.sha256(manifest).hexdigest(), index, checkpoint)


def verify_node(url: str, log: TransparencyLog | str | Path, public_key: Path | bytes,
                pinned: Checkpoint | None = None, timeout: float = 30.0) -> NodeVerification:
    """Fetch the node's privacy document and verify it (see the module docstring)."""
    import httpx

    try:
        response = httpx.get(url.rstrip("/") + "/v1/privacy/manifest", timeout=timeout)
        response.raise_for_status()
        doc = response.json()
    except (httpx.HTTPError, ValueError) as e:
        raise NodeVerificationError(f"cannot fetch the node's manifest ({type(e).__name__})") from None
    return verify_document(doc, log, public_key, pinned)
