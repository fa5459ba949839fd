"""Property tests of the KV block pool and the prefix-caching block tables.

A random program of admissions (with prefix lookups), appends, forks (a request sharing another's
prefix under the same salt), frees and allocations that force LRU eviction never leaks a block,
frees one twice or hands out one in use; a prefix hit always returns blocks holding exactly the
request's tokens under its salt; ref counts equal the number of block tables holding each block;
and when everything is freed, every block is free.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, precondition, rule

from llmserve.engine.block_pool import BlockPool, NoFreeBlocksError
from llmserve.engine.kv_cache import KVCacheManager
from llmserve.engine.request import Request
from llmserve.sampling_params import SamplingParams

PARAMS = SamplingParams()
TOKENS = st.integers(0, 3)  # a tiny alphabet, so prefixes collide often
SALTS = st.sampled_from([None, "a", "b"])
CHUNKS = st.one_of(st.integers(1, 3), st.integers(1, 24))  # small chunks: prefills left half done


def new_request(rid: str, tokens: list[int], salt: str | None) -> Request:
    return Request(rid, tokens, PARAMS, max_tokens=1000, cache_salt=salt)


class KVCacheMachine(RuleBasedStateMachine):
    """Drives KVCacheManager as the scheduler does, with a shadow of what each block holds."""

    live = Bundle("live")

    @initialize(num_blocks=st.integers(4, 24), block_size=st.integers(1, 4), caching=st.booleans(),
                wipe=st.booleans())
    def setup(self, num_blocks, block_size, caching, wipe):
        self.kv = KVCacheManager(num_blocks, block_size, enable_caching=caching, wipe_on_free=wipe)
        self.bs = block_size
        self.requests: dict[str, Request] = {}
        self.counter = 0
        # block id -> (salt, tokens by offset) written into it by a forward pass, or None if wiped.
        self.content: dict[int, tuple[str | None, dict[int, int]] | None] = {}
        self.hits = 0

    # ---- helpers ---------------------------------------------------------------------------
    def _write(self, req: Request, start: int, end: int) -> None:
        """What the forward pass does: write positions start..end-1 of req into its blocks."""
        table = self.kv.block_tables[req.request_id]
        for pos in range(start, end):
            block = table[pos // self.bs]
            entry = self.content.get(block.block_id)
            if entry is None or entry[0] != req.cache_salt:
                entry = (req.cache_salt, {})
            entry[1][pos % self.bs] = req.token_ids[pos]
            self.content[block.block_id] = entry

    def _admit(self, req: Request, chunk: int) -> bool:
        free_before = self.kv.num_free_blocks
        prefix = self.kv.find_cached_prefix(req)
        assert len(prefix) * self.bs < req.num_tokens  # one token is always left to compute
        for i, block in enumerate(prefix):  # a hit holds exactly these tokens, under this salt
            salt, toks = self.content[block.block_id]
            assert salt == req.cache_salt
            assert [toks.get(o) for o in range(self.bs)] == req.token_ids[i * self.bs:(i + 1) * self.bs]
        num_cached = len(prefix) * self.bs
        n = min(req.num_tokens - num_cached, chunk)
        if not self.kv.allocate(req, n, prefix):
            assert req.request_id not in self.kv.block_tables
            assert self.kv.num_free_blocks == free_before
            self.kv.free(req)  # the scheduler frees every request it is done with, admitted or not
            return False
        self.hits += len(prefix)
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
        free_before = self.kv.num_free_blocks
        if self.kv.allocate(req, n):
            self._write(req, start, start + n)
            req.num_computed_tokens += n
            self.kv.commit(req, req.num_computed_tokens)
            self.kv.end_step()
            assert self.kv.block_ids(rid)[:len(table_before)] == table_before
        else:
            assert self.kv.block_ids(rid) == table_before and self.kv.num_free_blocks == free_before

    @rule(rid=consumes(live))
    def free(self, rid):
        if rid is None or rid not in self.requests:
            return
        self.kv.free(self.requests.pop(rid))
        self.kv.free(new_request(rid, [0], None))  # freeing again (a finished id) is a no-op
        assert rid not in self.kv.block_tables
        self._after_free()

    @precondition(lambda self: self.kv.num_free_blocks > 0)
    @rule(salt=SALTS)
    def evict(self, salt):
        """An admission that takes every free block: cached free blocks are evicted LRU first."""
        tokens = [7] * (self.kv.num_free_blocks * self.bs)  # token 7 never occurs elsewhere
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
        for rid, table in self.kv.block_tables.items():
            assert rid in self.requests
            ids = [b.block_id for b in table]
            assert len(ids) == len(set(ids)), "a block twice in one table"
            for b in ids:
                holders[b] += 1
        assert [b.ref_count for b in pool.blocks] == holders
        free = set(pool._free)
        assert free == {b.block_id for b in pool.blocks if b.ref_count == 0}, "a block in use is on the free list"
        assert pool.num_free == len(free) == holders.count(0)

    @invariant()
    def tables_cover_computed_tokens(self):
        for rid, req in self.requests.items():
            table = self.kv.block_tables[rid]
            assert len(table) * self.bs >= req.num_computed_tokens
            assert len(table) == -(-req.num_computed_tokens // self.bs)

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
        assert not self.kv.block_tables and not self.kv._hashes
        if self.kv.wipe_on_free:
            assert not pool._cached


KVCacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                            suppress_health_check=[HealthCheck.too_slow])
TestKVCache = KVCacheMachine.TestCase


def test_prefix_hit_and_lru_eviction_order():
    """A worked example: hits share blocks, frees go tail first, and eviction takes the LRU block."""
    kv = KVCacheManager(6, 2, enable_caching=True, wipe_on_free=False)
    a = new_request("a", [1, 2, 3, 4, 5], None)
    assert kv.find_cached_prefix(a) == []
    assert kv.allocate(a, 5)
    b = new_request("b", [1, 2, 3, 4, 9], None)
    assert kv.find_cached_prefix(b) == []  # allocated, but no KV written yet: nothing published
    assert kv.in_flight_prefix(b, 0)  # ... it is in flight: b gains it by waiting a step
    a.num_computed_tokens = 5
    kv.commit(a, 5)
    kv.end_step()
    assert not kv.in_flight_prefix(b, 2)
    prefix = kv.find_cached_prefix(b)
    assert [blk.block_id for blk in prefix] == kv.block_ids("a")[:2]
    assert kv.allocate(b, 1, prefix)
    assert [blk.ref_count for blk in kv.block_tables["a"]] == [2, 2, 1]
    assert kv.num_free_blocks == 2
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 6
    # Cached blocks survive on the free list: the same prefix hits again, under the same salt only.
    c = new_request("c", [1, 2, 3, 4, 7, 7], None)
    assert len(kv.find_cached_prefix(c)) == 2
    assert kv.find_cached_prefix(new_request("d", [1, 2, 3, 4, 7], "salt")) == []
    # Taking every free block evicts them all; then nothing hits.
    e = new_request("e", [8] * 12, None)
    assert kv.allocate(e, 12)
    kv.free(e)
    assert kv.find_cached_prefix(c) == []


def test_block_pool_double_free_raises():
    pool = BlockPool(2, enable_caching=True)
    block = pool.allocate()
    pool.free(block, wipe=False)
    with pytest.raises(RuntimeError):
        pool.free(block, wipe=False)
    assert pool.num_free == 2
