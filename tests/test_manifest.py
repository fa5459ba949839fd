"""Verifiable transparency: a node's signed manifest, released in the transparency log, verified by
a client before it sends anything. Each way a node or log can lie fails a different check."""
from __future__ import annotations

import json
import shutil

import pytest

from llmserve.config import EngineConfig
from llmserve.privacy import manifest as manifest_mod
from llmserve.privacy.manifest import build_manifest, generate_key, sign_manifest
from llmserve.privacy.translog import TransparencyLog
from llmserve.privacy.verify import NodeVerificationError, node_document, verify_document
from tiny_models import llama_config, make_model_folder


@pytest.fixture
def node(tmp_path, monkeypatch):
    """A released node: its own copy of the package (so a test may change a byte of it), a tiny
    model, a signed manifest appended to the log."""
    package = tmp_path / "package"
    shutil.copytree(manifest_mod.package_root(), package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(manifest_mod, "package_root", lambda: package)
    model = tmp_path / "model"
    make_model_folder(model, llama_config(num_hidden_layers=1))
    generate_key(tmp_path / "key.pem", tmp_path / "key.pub")
    config = EngineConfig(model=str(model), seed=3)
    manifest = build_manifest(config, model)
    released = sign_manifest(manifest, tmp_path / "key.pem", tmp_path / "release")
    log = TransparencyLog(tmp_path / "log")
    log.append(b"an earlier release")
    log.append(manifest)
    return dict(tmp=tmp_path, package=package, model=model, release=released, log=log, manifest=manifest)


def _document(node):
    return node_document(node["release"], node["model"], None, node["log"])


def test_a_released_node_verifies_and_its_manifest_says_what_runs(node):
    result = verify_document(_document(node), node["log"], node["tmp"] / "key.pub")
    assert result.log_index == 1 and result.checkpoint.size == 2
    body = json.loads(node["manifest"])
    assert body["config"]["seed"] == 3
    assert any(k.startswith("package/engine/") for k in body["files"]) and any(k.startswith("model/") for k in body["files"])
    # Pinning the checkpoint and verifying again after a new release: the log only grew.
    node["log"].append(b"a later release")
    verify_document(_document(node), node["log"], node["tmp"] / "key.pub", pinned=result.checkpoint)


@pytest.mark.parametrize("where", ["package", "model"])
def test_one_changed_byte_fails(node, where):
    victim = next(p for p in sorted(node[where].rglob("*")) if p.is_file() and p.suffix in (".py", ".safetensors"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(NodeVerificationError, match="no longer hash to its manifest"):
        verify_document(_document(node), node["log"], node["tmp"] / "key.pub")


def test_a_wrong_key_fails(node):
    generate_key(node["tmp"] / "other.pem", node["tmp"] / "other.pub")
    with pytest.raises(NodeVerificationError, match="signature does not verify"):
        verify_document(_document(node), node["log"], node["tmp"] / "other.pub")


def test_a_manifest_not_in_the_log_fails(node):
    other = TransparencyLog(node["tmp"] / "other-log")
    other.append(b"something else")
    doc = node_document(node["release"], node["model"], None, other)
    with pytest.raises(NodeVerificationError, match="not in a transparency log"):
        verify_document(doc, other, node["tmp"] / "key.pub")
    # nor does a proof made for one log verify against another's checkpoint
    with pytest.raises(NodeVerificationError, match="not included"):
        verify_document(_document(node), other, node["tmp"] / "key.pub")


def test_a_rewritten_log_fails(node):
    pinned = verify_document(_document(node), node["log"], node["tmp"] / "key.pub").checkpoint
    entries = node["log"].path / "entries.jsonl"
    entries.write_text("\n".join(entries.read_text().splitlines()[1:]) + "\n")  # drop the earlier release
    node["log"].append(b"a replacement")
    with pytest.raises(NodeVerificationError, match="rewritten"):
        verify_document(_document(node), node["log"], node["tmp"] / "key.pub", pinned=pinned)


def test_a_tampered_document_fails(node):
    doc = _document(node)
    doc["manifest"] = doc["manifest"].replace('"seed":3', '"seed":4')
    with pytest.raises(NodeVerificationError, match="signature"):
        verify_document(doc, node["log"], node["tmp"] / "key.pub")
    with pytest.raises(NodeVerificationError, match="malformed"):
        verify_document({"manifest": 5}, node["log"], node["tmp"] / "key.pub")
