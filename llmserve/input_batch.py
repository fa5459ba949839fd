"""The runner's persistent batch: a row per running request, kept between steps.

Each step writes only what changed: a new request's tokens and block table in full, a running
request's appended tokens and new blocks, and drops the rows of requests that left. The flat
inputs of a step (token ids, positions, cache slots, block tables) are then gathered from the rows
with vectorized numpy, so no per-token Python runs per step. Each KV group (model/specs.py) has
its own block table per row. A window group's dropped entries keep their old ids in the row:
attention never reads outside the window.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llmserve.engine.block_pool import Block


class InputBatch:
    def __init__(self, block_size: int, rows: int = 64, width: int = 512, num_groups: int = 1) -> None:
        self.block_size = block_size
        self.token_ids = np.zeros((rows, width), dtype=np.int64)
        self.num_tokens = np.zeros(rows, dtype=np.int64)
        self.prompt_lens = np.zeros(rows, dtype=np.int64)
        self.block_tables = [np.zeros((rows, -(-width // block_size)), dtype=np.int32) for _ in range(num_groups)]
        self.num_blocks = np.zeros((num_groups, rows), dtype=np.int64)
        self.row_of: dict[str, int] = {}
        self._free_rows = list(range(rows - 1, -1, -1))

    def remove(self, request_ids: Sequence[str]) -> None:
        for rid in request_ids:
            row = self.row_of.pop(rid, None)
            if row is not None:
                self._free_rows.append(row)

    def sync(self, request_id: str, token_ids: list[int], num_prompt_tokens: int, tables: list[list[Block]]) -> int:
        """Bring request_id's row up to date with its tokens and block tables (one per group);
        returns the row."""
        row = self.row_of.get(request_id)
        if row is None:
            row = self._new_row(request_id, num_prompt_tokens)
        n, old = len(token_ids), int(self.num_tokens[row])
        if n > old:
            self._fit(width=n)
            self.token_ids[row, old:n] = token_ids[old:]
        self.num_tokens[row] = n
        for g, table in enumerate(tables):
            nb, old_nb = len(table), int(self.num_blocks[g, row])
            if nb > old_nb:
                self._fit(width=nb * self.block_size)
                # A dropped entry (id -1) reads as block 0: never read, but a valid index.
                self.block_tables[g][row, old_nb:nb] = [max(b.block_id, 0) for b in table[old_nb:]]
            self.num_blocks[g, row] = nb  # a table only grows at its end or is cut back (rejected drafts)
        return row

    def write_drafts(self, row: int, drafts: list[int]) -> None:
        """Put draft tokens after the row's known tokens (num_tokens is unchanged: the next sync
        overwrites them with what was accepted). The verify run reads them from here, and the
        sampler's penalty history of a draft position sees the drafts before it."""
        n = int(self.num_tokens[row])
        self._fit(width=n + len(drafts))
        self.token_ids[row, n:n + len(drafts)] = drafts

    def _new_row(self, request_id: str, num_prompt_tokens: int) -> int:
        if not self._free_rows:
            self._grow_rows()
        row = self._free_rows.pop()
        self.row_of[request_id] = row
        self.num_tokens[row] = self.num_blocks[:, row] = 0
        self.prompt_lens[row] = num_prompt_tokens
        return row

    def _grow_rows(self) -> None:
        old = len(self.num_tokens)
        self.token_ids = np.concatenate([self.token_ids, np.zeros_like(self.token_ids)])
        self.block_tables = [np.concatenate([t, np.zeros_like(t)]) for t in self.block_tables]
        self.num_blocks = np.concatenate([self.num_blocks, np.zeros_like(self.num_blocks)], axis=1)
        for name in ("num_tokens", "prompt_lens"):
            setattr(self, name, np.concatenate([getattr(self, name), np.zeros(old, dtype=np.int64)]))
        self._free_rows.extend(range(2 * old - 1, old - 1, -1))

    def _fit(self, width: int) -> None:
        """Widen the rows (doubling) so width tokens fit."""
        if width > self.token_ids.shape[1]:
            new = max(width, 2 * self.token_ids.shape[1])
            self.token_ids = np.pad(self.token_ids, ((0, 0), (0, new - self.token_ids.shape[1])))
            blocks = -(-new // self.block_size)
            self.block_tables = [np.pad(t, ((0, 0), (0, blocks - t.shape[1]))) for t in self.block_tables]

    def reset_table(self, request_id: str) -> None:
        """The request's table changed other than at its end (a KV policy compacted it): the next
        sync writes it whole."""
        row = self.row_of.get(request_id)
        if row is not None:
            self.num_blocks[:, row] = 0

    def gather(self, rows: np.ndarray, starts: np.ndarray, counts: np.ndarray,
               evicted: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Flat token ids, positions and, per KV group, cache slots of counts[i] tokens from
        position starts[i] of each row. evicted[i]: tokens row i's KV policy dropped, so a token's
        cache index is its position less that."""
        seq = np.repeat(np.arange(len(rows)), counts)
        offsets = np.arange(len(seq)) - np.repeat(np.cumsum(counts) - counts, counts)
        pos = starts[seq] + offsets
        r = rows[seq]
        index = pos - evicted[seq] if evicted is not None else pos
        blocks, within = index // self.block_size, index % self.block_size
        slots = [t[r, blocks].astype(np.int64) * self.block_size + within for t in self.block_tables]
        return self.token_ids[r, pos], pos, slots
