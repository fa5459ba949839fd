"""Fixed-size KV blocks: a free list in LRU order, ref counts, and the prefix-cache index.

A free block may still hold a cached prefix (its hash is kept) until it is handed out again;
handing out takes the least recently freed block first, which evicts LRU.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set once the block is full and registered in the cache
    wipe_on_evict: bool = False  # kept cached after a wiping free (a client's own salted prefix)

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_count}, cached={self.block_hash is not None})"


# A table entry whose KV is gone: a sliding-window group's block that fell out of its window. Never
# in a pool, never read (attention skips what is outside the window).
NULL_BLOCK = Block(-1)


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.enable_caching = enable_caching
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, Block] = {}
        self._to_wipe: list[int] = []  # freed blocks whose contents must be zeroed (wipe_kv_on_free)
        # Called with a cached block about to be handed out again (its prefix evicted from memory),
        # while its KV is still intact: the disk tier saves it there.
        self.on_evict: Callable[[Block], None] | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def lookup(self, block_hash: bytes) -> Block | None:
        return self._cached.get(block_hash)

    def allocate(self) -> Block:
        """Hand out the least recently freed block, evicting its cached prefix if it had one."""
        if not self._free:
            raise NoFreeBlocksError("no free KV blocks")
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if self.on_evict is not None and block.block_hash is not None and self._cached.get(block.block_hash) is block:
            self.on_evict(block)
        if block.wipe_on_evict:  # its retained prefix goes now: zero it before the new owner writes
            block.wipe_on_evict = False
            self._to_wipe.append(block_id)
        self._uncache(block)
        block.ref_count = 1
        return block

    def touch(self, block: Block) -> None:
        """Take a reference to a cached block (a prefix hit), pulling it off the free list if idle."""
        if block.ref_count == 0:
            del self._free[block.block_id]
        block.ref_count += 1

    def free(self, block: Block, wipe: bool, keep_cached: bool = False) -> None:
        """wipe: zero the block's KV once no request holds it. keep_cached (with wipe): a published
        block stays in the prefix index, reachable only by its salt's holders, and is zeroed when evicted."""
        if block.ref_count <= 0:
            raise RuntimeError(f"double free of KV block {block.block_id}")
        block.ref_count -= 1
        if block.ref_count == 0:
            if wipe and keep_cached and block.block_hash is not None:
                block.wipe_on_evict = True
            elif wipe:  # a wiped block keeps no prefix: nothing of the request outlives it
                self._uncache(block)
                self._to_wipe.append(block.block_id)
            self._free[block.block_id] = None

    def cache(self, block: Block, block_hash: bytes) -> None:
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self._cached:
            return  # an identical block is already indexed; this one stays private
        block.block_hash = block_hash
        self._cached[block_hash] = block

    def take_blocks_to_wipe(self) -> list[int]:
        ids, self._to_wipe = self._to_wipe, []
        return ids

    def reset_prefix_cache(self) -> None:
        for block in list(self._cached.values()):
            if block.wipe_on_evict:
                block.wipe_on_evict = False
                self._to_wipe.append(block.block_id)
            self._uncache(block)

    def _uncache(self, block: Block) -> None:
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) is block:
                del self._cached[block.block_hash]
            block.block_hash = None
