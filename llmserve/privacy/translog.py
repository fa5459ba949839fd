"""An append-only transparency log of released manifests, in a directory the operator publishes.

Each entry is the SHA-256 of one manifest (the manifest itself is published beside it); the log is
the RFC 9162 Merkle tree over those digests. A client pins a checkpoint (tree size and root) once,
and later checks that a node's manifest is included in the current tree (inclusion proof) and that
the current tree extends the pinned one (consistency proof): a log rewritten after the fact, an
entry removed or changed, fails the second check.

Layout:  entries.jsonl (one {"sha256": ...} per line, in order), checkpoint.json ({"size", "root"}).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llmserve.privacy import merkle

ENTRIES, CHECKPOINT = "entries.jsonl", "checkpoint.json"


@dataclass(frozen=True)
class Checkpoint:
    size: int
    root: bytes

    def to_json(self) -> dict:
        return {"size": self.size, "root": self.root.hex()}

    @classmethod
    def from_json(cls, value: dict) -> "Checkpoint":
        return cls(int(value["size"]), bytes.fromhex(value["root"]))


def manifest_leaf(manifest: bytes) -> bytes:
    """The log's leaf hash for one manifest's bytes."""
    return merkle.leaf_hash(hashlib.sha256(manifest).digest())


class TransparencyLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _digests(self) -> list[bytes]:
        file = self.path / ENTRIES
        if not file.exists():
            return []
        return [bytes.fromhex(json.loads(line)["sha256"]) for line in file.read_text().splitlines() if line.strip()]

    def leaves(self) -> list[bytes]:
        return [merkle.leaf_hash(d) for d in self._digests()]

    @property
    def size(self) -> int:
        return len(self._digests())

    def append(self, manifest: bytes) -> int:
        """Add a released manifest; returns its index. Existing entries are never rewritten."""
        self.path.mkdir(parents=True, exist_ok=True)
        index = self.size
        with open(self.path / ENTRIES, "a") as f:
            f.write(json.dumps({"sha256": hashlib.sha256(manifest).hexdigest()}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._write_checkpoint(self.checkpoint())
        return index

    def index_of(self, manifest: bytes) -> int | None:
        digest = hashlib.sha256(manifest).digest()
        digests = self._digests()
        return digests.index(digest) if digest in digests else None

    def checkpoint(self, size: int | None = None) -> Checkpoint:
        leaves = self.leaves()
        size = len(leaves) if size is None else size
        return Checkpoint(size, merkle.root(leaves[:size]))

    def published_checkpoint(self) -> Checkpoint:
        """What the operator published last (checkpoint.json), as a client reads it."""
        return Checkpoint.from_json(json.loads((self.path / CHECKPOINT).read_text()))

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        leaves = self.leaves()
        return merkle.inclusion_proof(index, leaves[:len(leaves) if size is None else size])

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        leaves = self.leaves()
        return merkle.consistency_proof(old_size, leaves[:len(leaves) if new_size is None else new_size])

    def _write_checkpoint(self, checkpoint: Checkpoint) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".checkpoint.")
        with os.fdopen(fd, "w") as f:
            json.dump(checkpoint.to_json(), f)
        os.replace(tmp, self.path / CHECKPOINT)
