"""What a node runs, as a signed manifest: the SHA-256 of every file of the installed llmserve
package (Python code and compiled kernels), of the model's files (the GGUF file a model came from,
too), and the frozen engine config.

The manifest is canonical JSON (sorted keys, no whitespace), so the same node always measures to
the same bytes. It is signed with the OpenSSF `model-signing` package in its offline key mode (an
elliptic-curve key; the signature is a Sigstore bundle holding a DSSE envelope over an in-toto
statement of the manifest's digest), and released by appending it to the transparency log
(translog.py).

What this proves, and what it cannot: a valid signature says the operator's key released this
manifest; inclusion in the log says the release is public and was not swapped quietly for one
client; a node whose files hash to the manifest runs that code. But the node reports its own
measurement: software cannot prove that the process answering is the one that measured, or that
nothing else runs beside it. Only a hardware enclave's attestation (a TPM or TEE quote over the
measured boot and the running image) could, and this machine has none.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import llmserve

MANIFEST_FILE, SIGNATURE_FILE = "manifest.json", "manifest.sig"
_SKIP_DIRS = {"__pycache__"}


class ManifestError(Exception):
    """A manifest that does not verify: the message says which check failed."""


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _tree(root: Path, prefix: str) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not _SKIP_DIRS & set(path.relative_to(root).parts) and path.suffix != ".pyc":
            out[f"{prefix}/{path.relative_to(root).as_posix()}"] = file_sha256(path)
    return out


def package_root() -> Path:
    return Path(llmserve.__file__).resolve().parent


def measure(model_folder: Path, model_source: Path | None = None) -> dict[str, str]:
    """The hashes of what runs now: package files, model files, the GGUF it came from."""
    files = _tree(package_root(), "package")
    files.update(_tree(Path(model_folder), "model"))
    if model_source is not None and Path(model_source).is_file():
        files[f"model-source/{Path(model_source).name}"] = file_sha256(Path(model_source))
    return files


def frozen_config(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def build_manifest(config: Any, model_folder: Path, model_source: Path | None = None) -> bytes:
    body = {"llmserve_manifest": 1, "version": getattr(llmserve, "__version__", "0"),
            "config": frozen_config(config), "files": measure(model_folder, model_source)}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def generate_key(private_path: Path, public_path: Path) -> None:
    """A fresh P-256 signing key (PKCS#8 PEM, owner-only) and its public key (SubjectPublicKeyInfo PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private_path = Path(private_path)
    private_path.touch(mode=0o600, exist_ok=False)
    private_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    Path(public_path).write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                serialization.PublicFormat.SubjectPublicKeyInfo))


def sign_manifest(manifest: bytes, private_key: Path, out_dir: Path) -> Path:
    """Write out_dir/manifest.json and out_dir/manifest.sig (model-signing, offline key mode)."""
    from model_signing import signing

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        signed = Path(tmp) / "manifest"  # model-signing signs a folder: the manifest alone in one
        signed.mkdir()
        (signed / MANIFEST_FILE).write_bytes(manifest)
        signing.Config().use_elliptic_key_signer(private_key=str(private_key)).sign(signed, Path(tmp) / SIGNATURE_FILE)
        shutil.copyfile(signed / MANIFEST_FILE, out_dir / MANIFEST_FILE)
        shutil.copyfile(Path(tmp) / SIGNATURE_FILE, out_dir / SIGNATURE_FILE)
    return out_dir


def verify_signature(manifest: bytes, signature: str, public_key: Path | bytes) -> None:
    """Raise ManifestError unless `signature` (a model-signing bundle) signs exactly `manifest`
    with the given public key (a PEM file or its bytes)."""
    from model_signing import verifying

    with tempfile.TemporaryDirectory() as tmp:
        signed = Path(tmp) / "manifest"
        signed.mkdir()
        (signed / MANIFEST_FILE).write_bytes(manifest)
        (Path(tmp) / SIGNATURE_FILE).write_text(signature)
        key = Path(public_key) if not isinstance(public_key, bytes) else Path(tmp) / "key.pem"
        if isinstance(public_key, bytes):
            key.write_bytes(public_key)
        try:
            verifying.Config().use_elliptic_key_verifier(public_key=str(key)).verify(signed, Path(tmp) / SIGNATURE_FILE)
        except Exception as e:  # model-signing raises ValueError and others for a bad signature
            raise ManifestError(f"the manifest's signature does not verify with this key ({type(e).__name__})") from None
