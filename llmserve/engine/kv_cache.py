"""Per-request block tables over the BlockPool, with automatic prefix caching.

A full block's hash chains its parent's hash, its token ids and the request's cache salt, so a
block is reused only by a request with the same salt and the same tokens before it. A block enters
the prefix index only once its KV is written and its tokens are final (`commit`, called by the
update point after the forward pass); until then it is "in flight", and a request that would hit
it waits a step instead of computing the same tokens again.
"""
from __future__ import annotations

import hashlib
import secrets
from array import array

from llmserve.engine.block_pool import Block, BlockPool
from llmserve.engine.request import Request


def block_hash(parent: bytes | None, token_ids: list[int], salt: str | None) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(array("q", token_ids).tobytes())
    h.update(b"\x00salt:" + salt.encode() if salt is not None else b"\x00nosalt")
    return h.digest()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool, wipe_on_free: bool,
                 private: bool = False) -> None:
        self.block_size = block_size
        # Private mode: a request without a cache_salt gets a random one of its own (no one shares
        # its blocks, not even while it runs), and its blocks are wiped when freed; a request with
        # its client's own secret salt keeps its published prefix for that client, wiped when evicted.
        self.private = private
        self._ephemeral_salts: dict[str, str] = {}
        self.pool = BlockPool(num_blocks, enable_caching)
        self.enable_caching = enable_caching
        self.wipe_on_free = wipe_on_free
        self.block_tables: dict[str, list[Block]] = {}
        self._hashes: dict[str, list[bytes]] = {}  # hashes of a request's full blocks, in order
        self._in_flight: dict[bytes, str] = {}  # hash -> id of the request whose step is writing it
        self._committed: dict[str, int] = {}  # request id -> how many of its blocks are published
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # tokens found there

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.block_tables.get(request_id, ())]

    def _full_block_hashes(self, req: Request, num_tokens: int) -> list[bytes]:
        """Hashes of the full blocks among the first num_tokens tokens, extending the memo."""
        hashes = self._hashes.setdefault(req.request_id, [])
        bs = self.block_size
        for i in range(len(hashes), num_tokens // bs):
            parent = hashes[-1] if hashes else None
            hashes.append(block_hash(parent, req.token_ids[i * bs:(i + 1) * bs], self._salt(req)))
        # The memo may reach further (a prefix lookup hashes blocks not yet computed): only the
        # blocks within num_tokens, or a block would be registered before its KV is written.
        return hashes[:num_tokens // bs]

    def find_cached_prefix(self, req: Request) -> list[Block]:
        """The longest run of cached blocks that starts the request. At least one token is always
        left to compute, because the last position's logits are needed to sample."""
        if not self.enable_caching:
            return []
        max_blocks = (req.num_tokens - 1) // self.block_size
        hits: list[Block] = []
        for h in self._full_block_hashes(req, max_blocks * self.block_size):
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def record_prefix_lookup(self, num_queried: int, num_hit: int) -> None:
        """Count one admitted request's prefix lookup, in tokens (failed admissions don't count)."""
        self.prefix_queries += num_queried
        self.prefix_hits += num_hit

    def allocate(self, req: Request, num_new_tokens: int, cached_prefix: list[Block] | None = None) -> bool:
        """Make room for num_new_tokens more tokens of req (after its computed ones, or after
        cached_prefix when it is being admitted). False, with nothing changed, if blocks run out."""
        table = self.block_tables.setdefault(req.request_id, [])
        cached_prefix = cached_prefix or []
        num_computed = len(cached_prefix) * self.block_size if cached_prefix else req.num_computed_tokens
        total = num_computed + num_new_tokens
        num_needed = -(-total // self.block_size) - len(table) - len(cached_prefix)
        idle_hits = sum(1 for b in cached_prefix if b.ref_count == 0)  # these come off the free list
        if num_needed + idle_hits > self.pool.num_free:
            if not table:
                del self.block_tables[req.request_id]
            return False
        for block in cached_prefix:
            self.pool.touch(block)
        table.extend(cached_prefix)
        table.extend(self.pool.allocate() for _ in range(max(num_needed, 0)))
        if self.enable_caching:  # full blocks this step writes: in flight until committed
            hashes = self._full_block_hashes(req, min(total, req.num_tokens))
            for h in hashes[num_computed // self.block_size:]:
                self._in_flight.setdefault(h, req.request_id)
        return True

    def in_flight_prefix(self, req: Request, num_hits: int) -> bool:
        """True if the block after req's num_hits cached blocks is being written by this step: the
        request gains that block for free by waiting one step."""
        if not self._in_flight:
            return False
        hashes = self._full_block_hashes(req, ((req.num_tokens - 1) // self.block_size) * self.block_size)
        return num_hits < len(hashes) and hashes[num_hits] in self._in_flight

    def commit(self, req: Request, num_tokens: int) -> None:
        """Publish req's full blocks among its first num_tokens tokens: their KV is written and
        their tokens are final. The update point calls it after each forward pass; only blocks
        not committed before are visited."""
        if not self.enable_caching:
            return
        rid = req.request_id
        done, full = self._committed.get(rid, 0), num_tokens // self.block_size
        if full <= done:
            return
        table = self.block_tables[rid]
        hashes = self._full_block_hashes(req, num_tokens)
        for i in range(done, full):
            self.pool.cache(table[i], hashes[i])
            if self._in_flight.get(hashes[i]) == rid:
                del self._in_flight[hashes[i]]
        self._committed[rid] = full

    def end_step(self) -> None:
        """Forget what the step had in flight (committed or not: a failed step publishes nothing)."""
        self._in_flight.clear()

    def truncate(self, req: Request, num_tokens: int) -> None:
        """Roll req's table back to the blocks its first num_tokens tokens need (a shortened
        request). Blocks past that go back to the pool unpublished. The runner's persistent row
        notices a cut only as a shorter table: a cut that regrows to the same length before the
        next step would leave the row pointing at freed blocks, so speculative decoding keeps a
        request's draft blocks instead (Scheduler._settle_drafts)."""
        table = self.block_tables.get(req.request_id)
        if table is None:
            return
        keep = -(-num_tokens // self.block_size)
        for block in reversed(table[keep:]):
            self.pool.free(block, wipe=self.wipe_on_free)
        del table[keep:]
        hashes = self._hashes.get(req.request_id)
        if hashes is not None:
            del hashes[num_tokens // self.block_size:]
        if req.request_id in self._committed:
            self._committed[req.request_id] = min(self._committed[req.request_id], num_tokens // self.block_size)

    def _salt(self, req: Request) -> str | None:
        if req.cache_salt is not None or not self.private:
            return req.cache_salt
        salt = self._ephemeral_salts.get(req.request_id)
        if salt is None:
            salt = self._ephemeral_salts[req.request_id] = secrets.token_hex(16)
        return salt

    def free(self, req: Request) -> None:
        """Release all of req's blocks. Tail blocks go first, so they are evicted before the
        shared prefix that other requests are likelier to hit."""
        keep = self.private and req.cache_salt is not None
        for block in reversed(self.block_tables.pop(req.request_id, [])):
            self.pool.free(block, wipe=self.wipe_on_free, keep_cached=keep)
        self._ephemeral_salts.pop(req.request_id, None)
        self._hashes.pop(req.request_id, None)
        self._committed.pop(req.request_id, None)
        if self._in_flight:  # a request preempted in the step that allocated its blocks
            for h in [h for h, rid in self._in_flight.items() if rid == req.request_id]:
                del self._in_flight[h]

    def take_blocks_to_wipe(self) -> list[int]:
        return self.pool.take_blocks_to_wipe()
