"""Per-request block tables over the BlockPool, one per KV group, with automatic prefix caching.

Each KV group (model/specs.py: the layers of one kind) has its own table per request; all draw
from one pool. A sliding-window group frees the blocks that fall out of its window (their
entries become NULL_BLOCK), so it holds window + one block per request.

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
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from llmserve.engine.block_pool import NULL_BLOCK, Block, BlockPool
from llmserve.engine.kv_offload import DiskKVTier
from llmserve.engine.request import Request


def block_hash(parent: bytes | None, token_ids: list[int], salt: str | None) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(array("q", token_ids).tobytes())
    h.update(b"\x00salt:" + salt.encode() if salt is not None else b"\x00nosalt")
    return h.digest()


@dataclass
class CachedPrefix:
    """A prefix hit: the request's first num_blocks blocks are cached, in each group (a window
    group holds only those its window needs, NULL_BLOCK before them)."""
    num_blocks: int = 0
    blocks: list[list[Block]] = field(default_factory=list)  # per group


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool, wipe_on_free: bool,
                 private: bool = False, windows: tuple[int | None, ...] = (None,), num_state_slots: int = 0) -> None:
        """windows: per KV group, its sliding window, or None for full attention (KVLayout.windows).
        num_state_slots: with state-space layers, the state group's slots (one per running
        request, the same size however long it is); their state cannot be rebuilt from blocks,
        so such a model has no prefix hits."""
        self.block_size = block_size
        self.windows = windows
        self.num_state_slots = num_state_slots
        self.state_slots: dict[str, int] = {}  # request id -> its slot
        self._free_slots = list(range(num_state_slots - 1, -1, -1))
        self._slots_to_wipe: list[int] = []
        enable_caching = enable_caching and not num_state_slots
        # Private mode: a request without a cache_salt gets a random one of its own (no one shares
        # its blocks, not even while it runs), and its blocks are wiped when freed; a request with
        # its client's own secret salt keeps its published prefix for that client, wiped when evicted.
        self.private = private
        self._ephemeral_salts: dict[str, str] = {}
        self.pool = BlockPool(num_blocks, enable_caching)
        self.enable_caching = enable_caching
        self.wipe_on_free = wipe_on_free
        self.tables: list[dict[str, list[Block]]] = [{} for _ in windows]  # per group
        # Group 0's (full attention where the model has it); a model without attention has no groups.
        self.block_tables = self.tables[0] if self.tables else {}
        # Per window group, request id -> how many leading entries of its table are NULL_BLOCK.
        self._dropped: list[dict[str, int]] = [{} for _ in windows]
        self._hashes: dict[str, list[bytes]] = {}  # hashes of a request's full blocks, in order
        self._in_flight: dict[bytes, str] = {}  # hash -> id of the request whose step is writing it
        self._committed: dict[str, int] = {}  # request id -> how many of its blocks are published
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # tokens found there (in memory or on the disk tier)
        self.disk_hits = 0  # of those, tokens read back from the disk tier
        self.tier: DiskKVTier | None = None
        self._read_block: Callable[[int], bytes] | None = None
        self._write_block: Callable[[int, bytes], None] | None = None

    def attach_tier(self, tier: DiskKVTier, read_block: Callable[[int], bytes],
                    write_block: Callable[[int, bytes], None]) -> None:
        """Offload evicted prefix blocks to `tier` (read_block: a block's K/V as bytes, from the
        runner) and bring them back on a hit (write_block)."""
        self.tier, self._read_block, self._write_block = tier, read_block, write_block
        self.pool.on_evict = self._offload

    def _offload(self, block: Block) -> None:
        key = block.block_hash
        group = key[-1] if len(key) > 16 else 0  # (_key appends the group to a 16-byte hash)
        if self.windows[group] is None:  # a window group's blocks are not read back from the tier
            self.tier.store(key, self._read_block(block.block_id))

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        """The fuller of the block pool and the state slots."""
        blocks = 1.0 - self.pool.num_free / self.pool.num_blocks
        if not self.num_state_slots:
            return blocks
        return max(blocks, len(self.state_slots) / self.num_state_slots)

    def block_ids(self, request_id: str) -> list[int]:
        """Group 0's block ids of the request."""
        return [b.block_id for b in self.block_tables.get(request_id, ())]

    def group_block_ids(self, request_id: str) -> list[list[int]]:
        """Each group's block ids of the request (-1 where a window group dropped the block)."""
        return [[b.block_id for b in t.get(request_id, ())] for t in self.tables]

    def held_blocks(self, request_id: str) -> list[int]:
        """How many blocks the request holds in each group."""
        return [sum(1 for b in t.get(request_id, ()) if b is not NULL_BLOCK) for t in self.tables]

    def _key(self, block_hash: bytes, group: int) -> bytes:
        """A block's prefix-index key in a group: its pages hold other layers in other groups."""
        return block_hash if group == 0 else block_hash + bytes((group,))

    def _first_needed(self, group: int, num_computed: int) -> int:
        """The first block the next query (at position num_computed) reads in group."""
        window = self.windows[group]
        return 0 if window is None else max(0, num_computed - window + 1) // self.block_size

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

    def find_cached_prefix(self, req: Request) -> CachedPrefix:
        """The longest run of cached blocks that starts the request, in every group (a window group
        needs only the blocks its window reads at the run's end). At least one token is always
        left to compute, because the last position's logits are needed to sample."""
        if not self.enable_caching or req.kv is not None:  # a lossy request rewrites its blocks: never shared
            return CachedPrefix(0, [[] for _ in self.windows])
        max_blocks = (req.num_tokens - 1) // self.block_size
        hashes = self._full_block_hashes(req, max_blocks * self.block_size)
        num = len(hashes)
        found: list[list[Block | None]] = []
        held: list[Block] = []  # earlier full groups' hits, off the free list while later ones read the tier
        for g, window in enumerate(self.windows):
            if window is None:
                hits: list[Block] = []
                for h in hashes[:num]:
                    block = self.pool.lookup(self._key(h, g))
                    if block is None:
                        break
                    hits.append(block)
                if self.tier is not None and len(hits) < num and self._key(hashes[len(hits)], g) in self.tier:
                    self._bring_back([self._key(h, g) for h in hashes[len(hits):num]], hits, count=not held)
                num = len(hits)
                found.append(hits)
                if self.tier is not None:
                    for block in hits:
                        self.pool.touch(block)
                    held.extend(hits)
            else:
                found.append([self.pool.lookup(self._key(h, g)) for h in hashes[:num]])
        for block in held:
            self.pool.free(block, wipe=False)
        shrunk = True
        while shrunk:  # a shorter run needs earlier blocks in the other window groups: until all agree
            shrunk = False
            for g, window in enumerate(self.windows):
                if window is not None:
                    fits = self._window_hit(g, found[g], num)
                    shrunk, num = shrunk or fits < num, fits
        blocks = []
        for g, window in enumerate(self.windows):
            first = self._first_needed(g, num * self.block_size)
            blocks.append([NULL_BLOCK] * first + found[g][first:num])
        return CachedPrefix(num, blocks)

    def _window_hit(self, group: int, found: list[Block | None], num: int) -> int:
        """The longest run, of at most num blocks, whose end the window group has cached."""
        while num > 0:
            missing = [i for i in range(self._first_needed(group, num * self.block_size), num) if found[i] is None]
            if not missing:
                break
            num = missing[-1]
        return num

    def _bring_back(self, hashes: list[bytes], hits: list[Block], count: bool = True) -> None:
        """Read the blocks of `hashes` (prefix-index keys) that follow the memory hits back from the
        disk tier, as long as they are there, into blocks that then sit in the prefix cache like
        any other. count: add the blocks' tokens to disk_hits (once per position, not per group)."""
        held = list(hits)
        for block in held:  # off the free list while new blocks are taken, so none is evicted
            self.pool.touch(block)
        try:
            for h in hashes:
                if h not in self.tier or self.pool.num_free == 0:
                    break
                data = self.tier.load(h)
                if data is None:
                    break
                block = self.pool.allocate()
                held.append(block)
                self._write_block(block.block_id, data)
                self.pool.cache(block, h)
                block.wipe_on_evict = self.wipe_on_free and self.pool.lookup(h) is block
                hits.append(block)
                if count:
                    self.disk_hits += self.block_size
        finally:
            for block in held:
                self.pool.free(block, wipe=False)

    def record_prefix_lookup(self, num_queried: int, num_hit: int) -> None:
        """Count one admitted request's prefix lookup, in tokens (failed admissions don't count)."""
        self.prefix_queries += num_queried
        self.prefix_hits += num_hit

    def allocate(self, req: Request, num_new_tokens: int, cached_prefix: CachedPrefix | None = None) -> bool:
        """Make room for num_new_tokens more tokens of req (after its computed ones, or after
        cached_prefix when it is being admitted), in every group; window groups first give back
        the blocks their next query no longer reads. A request's first allocation also takes its
        state slot. False, with no block or slot taken, if either runs out."""
        rid = req.request_id
        bs = self.block_size
        hit = cached_prefix is not None and cached_prefix.num_blocks > 0
        num_computed = cached_prefix.num_blocks * bs if hit else req.num_kv_tokens
        total = num_computed + num_new_tokens
        width = -(-total // bs)
        new_entries, needed, idle_hits = [], 0, 0
        for g, tables in enumerate(self.tables):
            table = tables.get(rid, [])
            prefix = cached_prefix.blocks[g] if hit else []
            first = self._first_needed(g, num_computed)
            if self.windows[g] is not None and table:
                self._drop(req, g, table, first)
            start = len(table) + len(prefix)
            new_entries.append((start, width))
            needed += max(0, width - max(start, first))
            idle_hits += sum(1 for b in prefix if b is not NULL_BLOCK and b.ref_count == 0)  # off the free list
        if needed + idle_hits > self.pool.num_free:
            return False
        if self.num_state_slots and rid not in self.state_slots:
            if not self._free_slots:
                return False
            self.state_slots[rid] = self._free_slots.pop()
        if hit:  # every group's hits off the free list before any block is taken, or one could be taken
            for blocks in cached_prefix.blocks:
                for block in blocks:
                    if block is not NULL_BLOCK:
                        self.pool.touch(block)
        for g, (tables, (start, end)) in enumerate(zip(self.tables, new_entries)):
            table = tables.setdefault(rid, [])
            table.extend(cached_prefix.blocks[g] if hit else [])
            first = self._first_needed(g, num_computed)
            table.extend(NULL_BLOCK if i < first else self.pool.allocate() for i in range(start, end))
            if self.windows[g] is not None:
                self._dropped[g][rid] = max(self._dropped[g].get(rid, 0), min(first, len(table)))
        if self.enable_caching and req.kv is None:  # full blocks this step writes: in flight until committed
            hashes = self._full_block_hashes(req, min(total, req.num_tokens))
            for h in hashes[num_computed // bs:]:
                self._in_flight.setdefault(h, rid)
        return True

    def _drop(self, req: Request, group: int, table: list[Block], first: int) -> None:
        """Give back a window group's blocks before index first (their KV stays published, as any
        freed block's does, until the pool hands the block out again)."""
        dropped = self._dropped[group].get(req.request_id, 0)
        if first <= dropped:
            return
        keep = self.private and req.cache_salt is not None
        for i in range(dropped, min(first, len(table))):
            if table[i] is not NULL_BLOCK:
                self.pool.free(table[i], wipe=self.wipe_on_free, keep_cached=keep)
                table[i] = NULL_BLOCK
        self._dropped[group][req.request_id] = first

    def in_flight_prefix(self, req: Request, num_hits: int) -> bool:
        """True if the block after req's num_hits cached blocks is being written by this step: the
        request gains that block for free by waiting one step."""
        if not self._in_flight or req.kv is not None:
            return False
        hashes = self._full_block_hashes(req, ((req.num_tokens - 1) // self.block_size) * self.block_size)
        return num_hits < len(hashes) and hashes[num_hits] in self._in_flight

    def commit(self, req: Request, num_tokens: int) -> None:
        """Publish req's full blocks among its first num_tokens tokens: their KV is written and
        their tokens are final. The update point calls it after each forward pass; only blocks
        not committed before are visited."""
        if not self.enable_caching or req.kv is not None:  # a lossy request's blocks are never published
            return
        rid = req.request_id
        done, full = self._committed.get(rid, 0), num_tokens // self.block_size
        if full <= done:
            return
        hashes = self._full_block_hashes(req, num_tokens)
        for g, tables in enumerate(self.tables):
            table = tables[rid]
            for i in range(done, full):
                if table[i] is not NULL_BLOCK:
                    self.pool.cache(table[i], self._key(hashes[i], g))
        for h in hashes[done:full]:
            if self._in_flight.get(h) == rid:
                del self._in_flight[h]
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
        if req.request_id not in self.block_tables:
            return
        keep = -(-num_tokens // self.block_size)
        for g, tables in enumerate(self.tables):
            table = tables[req.request_id]
            for block in reversed(table[keep:]):
                if block is not NULL_BLOCK:
                    self.pool.free(block, wipe=self.wipe_on_free)
            del table[keep:]
            if req.request_id in self._dropped[g]:
                self._dropped[g][req.request_id] = min(self._dropped[g][req.request_id], keep)
        hashes = self._hashes.get(req.request_id)
        if hashes is not None:
            del hashes[num_tokens // self.block_size:]
        if req.request_id in self._committed:
            self._committed[req.request_id] = min(self._committed[req.request_id], num_tokens // self.block_size)

    def compact(self, req: Request, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keep only the cached tokens at indices `keep` (ascending) of req, moved to the front of
        its table in order; the blocks past them go back to the pool. Returns the (source,
        destination) cache slots of the moves, which the caller applies before the freed blocks
        are wiped or handed out. Only for one group of full attention (lossy policies refuse
        models with window layers)."""
        assert len(self.tables) == 1 and self.windows[0] is None
        table = self.block_tables[req.request_id]
        ids = np.fromiter((b.block_id for b in table), dtype=np.int64, count=len(table))
        bs = self.block_size
        dst = np.arange(len(keep))
        moved = keep != dst
        src_slots = ids[keep[moved] // bs] * bs + keep[moved] % bs
        dst_slots = ids[dst[moved] // bs] * bs + dst[moved] % bs
        num_blocks = -(-len(keep) // bs)
        for block in reversed(table[num_blocks:]):
            self.pool.free(block, wipe=self.wipe_on_free)
        del table[num_blocks:]
        return src_slots, dst_slots

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
        for tables, dropped in zip(self.tables, self._dropped):
            for block in reversed(tables.pop(req.request_id, [])):
                if block is not NULL_BLOCK:
                    self.pool.free(block, wipe=self.wipe_on_free, keep_cached=keep)
            dropped.pop(req.request_id, None)
        slot = self.state_slots.pop(req.request_id, None)
        if slot is not None:
            self._free_slots.append(slot)
            if self.wipe_on_free:
                self._slots_to_wipe.append(slot)
        self._ephemeral_salts.pop(req.request_id, None)
        self._hashes.pop(req.request_id, None)
        self._committed.pop(req.request_id, None)
        if self._in_flight:  # a request preempted in the step that allocated its blocks
            for h in [h for h, rid in self._in_flight.items() if rid == req.request_id]:
                del self._in_flight[h]

    def take_blocks_to_wipe(self) -> list[int]:
        return self.pool.take_blocks_to_wipe()

    def take_state_slots_to_wipe(self) -> list[int]:
        slots, self._slots_to_wipe = self._slots_to_wipe, []
        return slots
