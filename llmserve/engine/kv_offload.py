"""A disk tier under the prefix cache: full blocks evicted from memory are written here, and a prefix
lookup that misses in memory finds them here and reads them back instead of recomputing them.

One file per block, named by the block's hash (its salted token chain, so a name says nothing of
the tokens), holding its K and V for every layer. The directory is bounded: past `max_bytes` the
least recently used files go. Each start writes into a fresh subdirectory of its own, which is
removed at shutdown, so no run reads another's files. Plain blocks are read back memory-mapped.

Encrypted (private mode): each file is AES-256-GCM under a key drawn at start that lives only in
this process's memory (never written anywhere), with the block hash as associated data, so a file
cannot be swapped for another's; the key is dropped and the files removed at shutdown.
"""
from __future__ import annotations

import atexit
import mmap
import os
import secrets
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path

NONCE_BYTES = 12


class DiskKVTier:
    def __init__(self, root: str | Path, max_bytes: int, encrypt: bool) -> None:
        if max_bytes <= 0:
            raise ValueError("the KV offload tier needs a positive size")
        Path(root).mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="llmserve-kv-", dir=root))  # 0700, this run's own
        self.max_bytes = max_bytes
        self._aead = None
        if encrypt:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            self._aead = AESGCM(AESGCM.generate_key(bit_length=256))
        self._files: OrderedDict[bytes, int] = OrderedDict()  # block hash -> file size, LRU first
        self.bytes_stored = 0
        self.bytes_written = 0
        self.bytes_read = 0
        self.hits = 0  # blocks read back
        self.closed = False
        atexit.register(self.close)

    @property
    def encrypted(self) -> bool:
        return self._aead is not None

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._files

    def __len__(self) -> int:
        return len(self._files)

    def _path(self, block_hash: bytes) -> Path:
        return self.dir / f"{block_hash.hex()}.kv"

    def store(self, block_hash: bytes, data: bytes) -> None:
        """Write one block's K/V bytes under its hash, evicting LRU files to fit."""
        if self.closed:
            return
        if block_hash in self._files:  # the same hash is the same tokens: the same K/V
            self._files.move_to_end(block_hash)
            return
        if self._aead is not None:
            nonce = secrets.token_bytes(NONCE_BYTES)
            data = nonce + self._aead.encrypt(nonce, data, block_hash)
        if len(data) > self.max_bytes:
            return
        while self.bytes_stored + len(data) > self.max_bytes:
            self._drop(next(iter(self._files)))
        path = self._path(block_hash)
        with open(path, "wb") as f:
            f.write(data)
        self._files[block_hash] = len(data)
        self.bytes_stored += len(data)
        self.bytes_written += len(data)

    def load(self, block_hash: bytes) -> bytes | None:
        """The block's K/V bytes, or None if it is not here (or its file fails to authenticate)."""
        if self.closed or block_hash not in self._files:
            return None
        self._files.move_to_end(block_hash)
        path = self._path(block_hash)
        if self._aead is None:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                kv = bytes(m)
        else:
            from cryptography.exceptions import InvalidTag

            raw = path.read_bytes()
            try:
                plain = self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], block_hash)
            except InvalidTag:
                self._drop(block_hash)
                return None
            kv = plain
        self.bytes_read += self._files[block_hash]
        self.hits += 1
        return kv

    def _drop(self, block_hash: bytes) -> None:
        size = self._files.pop(block_hash, None)
        if size is not None:
            self.bytes_stored -= size
            self._path(block_hash).unlink(missing_ok=True)

    def close(self) -> None:
        """Remove every file and the directory; the key goes with this object."""
        self.closed = True
        self._files.clear()
        self.bytes_stored = 0
        self._aead = None
        shutil.rmtree(self.dir, ignore_errors=True)
        atexit.unregister(self.close)

    def __repr__(self) -> str:
        return f"DiskKVTier(blocks={len(self._files)}, bytes={self.bytes_stored}, encrypted={self.encrypted})"


def tier_for(root: str | None, max_bytes: int, private: bool) -> DiskKVTier | None:
    if root is None:
        return None
    return DiskKVTier(os.path.expanduser(root), max_bytes, encrypt=private)
