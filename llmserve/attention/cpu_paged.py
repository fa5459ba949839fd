"""CPU attention backend: one kernel call per layer (csrc/paged_attention.cpp) writes the step's
K/V into the paged cache and attends for every sequence of the step, whatever its number of new
tokens (decode, verify, prefill chunk over a cached prefix), reading the cache in place."""
from __future__ import annotations

import torch

from llmserve.attention.backend import KVCaches
from llmserve.attention.metadata import AttentionBatch, AttentionLayer


class CpuPagedAttention:
    def __init__(self, kernels, kv_caches: KVCaches) -> None:
        self.kernels = kernels
        self.kv_caches = kv_caches

    def prepare(self, batch: AttentionBatch) -> None:
        self.batch = batch
        self._logits: list[torch.Tensor] = []
        scored = batch.scored_rows
        self._scored = torch.from_numpy(scored) if scored is not None and len(scored) else None
        if self._scored is not None:
            self._logits_len = int(batch.seq_lens_host[:batch.num_decodes].max())

    def forward(self, layer: AttentionLayer, q, k, v) -> torch.Tensor:
        b = self.batch
        k_cache, v_cache = self.kv_caches[layer.index]
        logits = None
        if self._scored is not None:  # the kernel writes each decode row's logits as it attends
            logits = torch.full((b.num_seqs, q.shape[1], self._logits_len), float("-inf"))
        slot_mapping, block_tables = b.group(layer.group)
        out = self.kernels.paged_attention(q, k, v, k_cache, v_cache, slot_mapping, b.query_start_loc, b.seq_lens,
                                           block_tables, b.block_size, layer.scale, layer.sliding_window or 0,
                                           layer.soft_cap or 0.0, logits)
        if logits is not None:
            self._logits.append(logits[self._scored])
        return out

    def stack_args(self) -> tuple | None:
        """What a DecoderStack's forward takes of the step beside the hidden states (csrc/decoder_stack.h),
        or None in a step that reports decode attention logits, which the stack does not."""
        if self._scored is not None:
            return None
        b = self.batch
        groups = [b.group(g) for g in range(1 + len(b.other_groups))]
        return ([k for k, _ in self.kv_caches], [v for _, v in self.kv_caches], [s for s, _ in groups],
                [t for _, t in groups], b.query_start_loc, b.seq_lens, b.block_size)

    def take_decode_logits(self) -> torch.Tensor | None:
        """[layers, scored rows, heads, length] of the last forward pass (-inf past a row's context)."""
        logits, self._logits = self._logits, []
        return torch.stack(logits) if logits else None
