"""Property tests of the KV block pool and the prefix-caching block tables.

A random program of admissions (with prefix lookups), appends, forks (a request sharing another's
prefix under the same salt), frees and allocations that force LRU eviction never leaks a block,
frees one twice or hands out one in use; a prefix hit always returns blocks holding exactly the
request's tokens under its salt; ref counts equal the number of block tables holding each block;
and when everything is freed, every block is free. The same program runs over layouts of several
KV groups with sliding windows: a window group's hits and tables hold every block the next query
reads, with the right tokens in the right group, and nothing before them.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, precondition, rule

from llmserve.engine.block_pool import NULL_BLOCK, BlockPool, NoFreeBlocksError
from llmserve.engine.kv_cache import KVCacheManager
from llmserve.engine.request import Request
from llmserve.sampling_params import SamplingParams

PARAMS = SamplingParams()
TOKENS = st.integers(0, 3)  # a tiny alphabet, so prefixes collide often
SALTS = st.sampled_from([None, "a", "b"])
CHUNKS = st.one_of(st.integers(1, 3), st.integers(1, 24))  # small chunks: prefills left half done
WINDOWS = st.integers(2, 7).flatmap(lambda w: st.sampled_from([(None,), (None, w), (w,), (None, w, w + 2)]))


def new_request(rid: str, tokens: list[int], salt: str | None) -> Request:
    return Request(rid, tokens, PARAMS, max_tokens=1000, cache_salt=salt)


class KVCacheMachine(RuleBasedStateMachine):
    """Drives KVCacheManager as the scheduler does, with a shadow of what each block holds."""

    live = Bundle("live")

    @initialize(num_blocks=st.integers(4, 24), block_size=st.integers(1, 4), caching=st.booleans(),
                wipe=st.booleans(), windows=WINDOWS)
    def setup(self, num_blocks, block_size, caching, wipe, windows):
        self.kv = KVCacheManager(num_blocks, block_size, enable_caching=caching, wipe_on_free=wipe, windows=windows)
        self.bs = block_size
        self.windows = windows
        self.requests: dict[str, Request] = {}
        self.counter = 0
        # block id -> (group, salt, tokens by offset) written into it by a forward pass, or None if wiped.
        self.content: dict[int, tuple[int, str | None, dict[int, int]] | None] = {}
        self.hits = 0

    # ---- helpers ---------------------------------------------------------------------------
    def _first_needed(self, group: int, num_computed: int) -> int:
        """The first block a query at position num_computed reads in group."""
        w = self.windows[group]
        return 0 if w is None else max(0, num_computed - w + 1) // self.bs

    def _write(self, req: Request, start: int, end: int) -> None:
        """What the forward pass does: write positions start..end-1 of req into its blocks, in every group."""
        for g, tables in enumerate(self.kv.tables):
            table = tables[req.request_id]
            for pos in range(start, end):
                block = table[pos // self.bs]
                assert block is not NULL_BLOCK, "a block the step writes was dropped"
                entry = self.content.get(block.block_id)
                if entry is None or entry[:2] != (g, req.cache_salt):
                    entry = (g, req.cache_salt, {})
                entry[2][pos % self.bs] = req.token_ids[pos]
                self.content[block.block_id] = entry

    def _check_reads(self, req: Request, start: int) -> None:
        """Every block a step from position start reads is held, in every group; a window group holds none before."""
        for g, tables in enumerate(self.kv.tables):
            table = tables[req.request_id]
            first = self._first_needed(g, start)
            assert all(b is NULL_BLOCK for b in table[:first]), "a window group holds a block it no longer reads"
            assert all(b is not NULL_BLOCK for b in table[first:]), "a block the step reads was dropped"

    def _admit(self, req: Request, chunk: int) -> bool:
        free_before = self.kv.num_free_blocks
        prefix = self.kv.find_cached_prefix(req)
        num_cached = prefix.num_blocks * self.bs
        assert num_cached < req.num_tokens  # one token is always left to compute
        for g, blocks in enumerate(prefix.blocks):
            assert len(blocks) == prefix.num_blocks
            first = self._first_needed(g, num_cached)
            assert all(b is NULL_BLOCK for b in blocks[:first]) and NULL_BLOCK not in blocks[first:]
            for i in range(first, prefix.num_blocks):  # a hit holds exactly these tokens, under this salt
                group, salt, toks = self.content[blocks[i].block_id]
                assert (group, salt) == (g, req.cache_salt)
                assert [toks.get(o) for o in range(self.bs)] == req.token_ids[i * self.bs:(i + 1) * self.bs]
        n = min(req.num_tokens - num_cached, chunk)
        if not self.kv.allocate(req, n, prefix):
            assert all(req.request_id not in t for t in self.kv.tables)
            assert self.kv.num_free_blocks == free_before
            self.kv.free(req)  # the scheduler frees every request it is done with, admitted or not
            return False
        self._check_reads(req, num_cached)
        self._wipe_before_forward()
        self.hits += prefix.num_blocks
        req.num_computed_tokens = num_cached
        self._write(req, num_cached, num_cached + n)
        req.num_computed_tokens += n
        self.kv.commit(req, req.num_computed_tokens)  # the update point, after the forward pass
        self.kv.end_step()
        self.requests[req.request_id] = req
        return True

    def _next_id(self) -> str:
        self.counter += 1
        return f"r{self.counter}"

    def _after_free(self) -> None:
        for block_id in self.kv.take_blocks_to_wipe():
            assert self.kv.pool.blocks[block_id].ref_count == 0
            assert self.kv.pool.blocks[block_id].block_hash is None
            self.content[block_id] = None

    def _wipe_before_forward(self) -> None:
        """As the engine does between scheduling and the forward pass: blocks a window group gave
        back may already be someone else's, and are zeroed before that one writes them."""
        for block_id in self.kv.take_blocks_to_wipe():
            assert self.kv.pool.blocks[block_id].block_hash is None
            self.content[block_id] = None

    # ---- rules -----------------------------------------------------------------------------
    @rule(target=live, tokens=st.lists(TOKENS, min_size=1, max_size=20), salt=SALTS, chunk=CHUNKS)
    def admit(self, tokens, salt, chunk):
        req = new_request(self._next_id(), tokens, salt)
        return req.request_id if self._admit(req, chunk) else None

    @precondition(lambda self: self.requests)
    @rule(target=live, data=st.data(), extra=st.lists(TOKENS, max_size=6), chunk=CHUNKS)
    def fork(self, data, extra, chunk):
        """A new request that starts with a prefix of a live request's tokens (computed or not yet:
        two users with one system prompt, the first still mid-prefill), under the same salt."""
        parent = self.requests[data.draw(st.sampled_from(sorted(self.requests)))]
        cut = data.draw(st.integers(1, parent.num_tokens))
        req = new_request(self._next_id(), parent.token_ids[:cut] + extra, parent.cache_salt)
        return req.request_id if self._admit(req, chunk) else None

    @rule(rid=live, new=st.lists(TOKENS, max_size=5), chunk=CHUNKS)
    def append(self, rid, new, chunk):
        """Continue a live request: compute its next chunk, after sampling new tokens if caught up."""
        if rid is None or rid not in self.requests:
            return
        req = self.requests[rid]
        if req.num_computed_tokens == req.num_tokens:
            for t in new or [0]:
                req.append_token(t)
        start = req.num_computed_tokens
        n = min(req.num_tokens - start, chunk)
        table_before = self.kv.block_ids(rid)
        if self.kv.allocate(req, n):
            self._check_reads(req, start)
            self._wipe_before_forward()
            self._write(req, start, start + n)
            req.num_computed_tokens += n
            self.kv.commit(req, req.num_computed_tokens)
            self.kv.end_step()
            if self.windows[0] is None:
                assert self.kv.block_ids(rid)[:len(table_before)] == table_before
        else:  # nothing taken (a window group may have given back what it no longer reads)
            assert len(self.kv.block_ids(rid)) == len(table_before)
            self._check_reads(req, start)

    @rule(rid=consumes(live))
    def free(self, rid):
        if rid is None or rid not in self.requests:
            return
        self.kv.free(self.requests.pop(rid))
        self.kv.free(new_request(rid, [0], None))  # freeing again (a finished id) is a no-op
        assert all(rid not in t for t in self.kv.tables)
        self._after_free()

    @precondition(lambda self: self.kv.num_free_blocks > 0)
    @rule(salt=SALTS)
    def evict(self, salt):
        """An admission that takes every free block: cached free blocks are evicted LRU first."""
        if len(self.windows) > 1 and self.kv.num_free_blocks % len(self.windows):
            return  # groups take a block each per block of tokens
        tokens = [7] * (self.kv.num_free_blocks // len(self.windows) * self.bs)  # token 7 never occurs elsewhere
        if not tokens:
            return
        if self.windows != (None,):  # a hit of a window group takes fewer blocks than it covers: none here
            salt = f"evict-{self.counter}"
        req = new_request(self._next_id(), tokens, salt)
        assert self._admit(req, len(tokens))
        assert self.kv.num_free_blocks == 0
        # Nothing is left to hand out.
        with pytest.raises(NoFreeBlocksError):
            self.kv.pool.allocate()
        blocked = new_request(self._next_id(), [1, 2], salt)
        assert not self.kv.allocate(blocked, 2)
        self.kv.free(blocked)
        self.kv.free(self.requests.pop(req.request_id))
        self._after_free()

    # ---- invariants ------------------------------------------------------------------------
    @invariant()
    def refcounts_match_tables(self):
        pool = self.kv.pool
        holders = [0] * pool.num_blocks
        for rid in self.kv.block_tables:
            assert rid in self.requests
            ids = [b.block_id for t in self.kv.tables for b in t[rid] if b is not NULL_BLOCK]
            assert len(ids) == len(set(ids)), "a block twice in one request's tables"
            for b in ids:
                holders[b] += 1
        assert [b.ref_count for b in pool.blocks] == holders
        free = set(pool._free)
        assert free == {b.block_id for b in pool.blocks if b.ref_count == 0}, "a block in use is on the free list"
        assert pool.num_free == len(free) == holders.count(0)

    @invariant()
    def tables_cover_computed_tokens(self):
        for rid, req in self.requests.items():
            for tables in self.kv.tables:
                assert len(tables[rid]) == -(-req.num_computed_tokens // self.bs)

    @invariant()
    def cache_index_is_consistent(self):
        pool = self.kv.pool
        for h, block in pool._cached.items():
            assert block.block_hash == h
        for block in pool.blocks:
            if block.block_hash is not None:
                assert pool._cached.get(block.block_hash) is block
        if not self.kv.enable_caching:
            assert not pool._cached

    def teardown(self):
        if not hasattr(self, "kv"):
            return
        for rid in list(self.requests):
            self.kv.free(self.requests.pop(rid))
        self._after_free()
        pool = self.kv.pool
        assert self.kv.num_free_blocks == pool.num_blocks
        assert all(b.ref_count == 0 for b in pool.blocks)
        assert not any(self.kv.tables) and not self.kv._hashes
        if self.kv.wipe_on_free:
            assert not pool._cached


KVCacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                            suppress_health_check=[HealthCheck.too_slow])
TestKVCache = KVCacheMachine.TestCase


def test_prefix_hit_and_lru_eviction_order():
    """A worked example: hits share blocks, frees go tail first, and eviction takes the LRU block."""
    kv = KVCacheManager(6, 2, enable_caching=True, wipe_on_free=False)
    a = new_request("a", [1, 2, 3, 4, 5], None)
    assert kv.find_cached_prefix(a).num_blocks == 0
    assert kv.allocate(a, 5)
    b = new_request("b", [1, 2, 3, 4, 9], None)
    assert kv.find_cached_prefix(b).num_blocks == 0  # allocated, but no KV written yet: nothing published
    assert kv.in_flight_prefix(b, 0)  # ... it is in flight: b gains it by waiting a step
    a.num_computed_tokens = 5
    kv.commit(a, 5)
    kv.end_step()
    assert not kv.in_flight_prefix(b, 2)
    prefix = kv.find_cached_prefix(b)
    assert [blk.block_id for blk in prefix.blocks[0]] == kv.block_ids("a")[:2]
    assert kv.allocate(b, 1, prefix)
    assert [blk.ref_count for blk in kv.block_tables["a"]] == [2, 2, 1]
    assert kv.num_free_blocks == 2
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 6
    # Cached blocks survive on the free list: the same prefix hits again, under the same salt only.
    c = new_request("c", [1, 2, 3, 4, 7, 7], None)
    assert kv.find_cached_prefix(c).num_blocks == 2
    assert kv.find_cached_prefix(new_request("d", [1, 2, 3, 4, 7], "salt")).num_blocks == 0
    # Taking every free block evicts them all; then nothing hits.
    e = new_request("e", [8] * 12, None)
    assert kv.allocate(e, 12)
    kv.free(e)
    assert kv.find_cached_prefix(c).num_blocks == 0


def test_block_pool_double_free_raises():
    pool = BlockPool(2, enable_caching=True)
    block = pool.allocate()
    pool.free(block, wipe=False)
    with pytest.raises(RuntimeError):
        pool.free(block, wipe=False)
    assert pool.num_free == 2


def test_a_hit_in_a_later_group_is_not_handed_out_to_an_earlier_one():
    """Regression: a window group's hit block may be the least recently freed block (window groups
    give blocks back early); admission takes every group's hits off the free list before it takes
    new blocks for any group, so a full group's new block is never that hit."""
    kv = KVCacheManager(20, 1, enable_caching=True, wipe_on_free=False, windows=(None, 2))
    a = new_request("a", list(range(1, 11)), None)
    for n in (3, 2, 1, 1, 1, 1, 1):  # step by step: the window group gives back its blocks 0..7 on the way
        assert kv.allocate(a, n)
        a.num_computed_tokens += n
        kv.commit(a, a.num_computed_tokens)
        kv.end_step()
    assert kv.held_blocks("a") == [10, 2] and kv.num_free_blocks == 8
    kv.free(a)
    b = new_request("b", [1, 2, 3, 4, 99, 99, 99, 99], None)
    prefix = kv.find_cached_prefix(b)
    assert prefix.num_blocks == 4 and prefix.blocks[1][:3] == [NULL_BLOCK] * 3
    assert kv.allocate(b, 4, prefix)  # the full group's 4 new blocks come from the front of the free list
    ids = [blk.block_id for t in kv.tables for blk in t["b"] if blk is not NULL_BLOCK]
    assert len(ids) == len(set(ids)) == 8 + 5


class _MemoryTier:
    """The disk tier's interface over a dict (engine/kv_offload.py keeps files)."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def __contains__(self, key: bytes) -> bool:
        return key in self.data

    def store(self, key: bytes, data: bytes) -> None:
        self.data[key] = data

    def load(self, key: bytes) -> bytes | None:
        return self.data.get(key)


def test_bringing_back_two_full_groups_never_shares_a_block():
    """Regression: with two full-attention groups and the disk tier, the second group's blocks read
    back from disk must not take the first group's hits (they are held until the lookup ends)."""
    kv = KVCacheManager(9, 1, enable_caching=True, wipe_on_free=False, windows=(None, None))
    kv.attach_tier(_MemoryTier(), read_block=lambda i: bytes([i]), write_block=lambda i, data: None)
    a = new_request("a", [1, 2, 3], None)
    assert kv.allocate(a, 3)
    a.num_computed_tokens = 3
    kv.commit(a, 3)
    kv.end_step()
    kv.free(a)
    e = new_request("e", [7, 7, 7, 7], None)  # takes 8 of the 9 blocks: a's go to the tier
    assert kv.allocate(e, 4)
    kv.free(e)
    r = new_request("r", [5, 5, 5], None)  # holds 6: 3 left free
    assert kv.allocate(r, 3)
    b = new_request("b", [1, 2, 3, 9], None)
    prefix = kv.find_cached_prefix(b)
    ids = [blk.block_id for blocks in prefix.blocks for blk in blocks]
    assert len(ids) == len(set(ids)), "one block in both groups' hits"
    if prefix.num_blocks:
        assert kv.allocate(b, 1, prefix)
