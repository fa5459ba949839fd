"""Attention over the paged KV cache: the interface, and the plain-torch reference backend.

A backend owns its per-step state: the runner calls `prepare(batch)` once per step, then each
layer calls `forward(layer, q, k, v)`. `forward` writes the layer's new K/V for every token of the
step into the cache before any attention reads it (a request may attend to K/V that another
request of the same step wrote), and returns the attention output [T, H, D].
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from llmserve.attention.kv_dtype import bits, to_cache
from llmserve.attention.metadata import AttentionBatch, AttentionLayer

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (K, V), each [num_slots, kv_heads, head_dim]


class AttentionBackend(Protocol):
    kv_caches: KVCaches

    def prepare(self, batch: AttentionBatch) -> None: ...

    def forward(self, layer: AttentionLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KVH, D] (rows may be strided views of a fused qkv)."""
        ...

    def take_decode_logits(self) -> torch.Tensor | None:
        """The attention logits of the batch's scored_rows in the last forward pass, [layers,
        rows, heads, length], -inf where a row does not attend; None when none were asked for."""
        ...


class TorchAttention:
    """The reference, on any device: all decodes in one grouped matmul over their gathered
    context, each longer query (prefill chunk, verify run) through scaled_dot_product_attention
    with its causal mask offset by the cached prefix. Everything that needs host values is
    derived in prepare(), so forward never syncs the device."""

    def __init__(self, kv_caches: KVCaches) -> None:
        self.kv_caches = kv_caches

    def prepare(self, batch: AttentionBatch) -> None:
        self.batch = batch
        self._logits: list[torch.Tensor] = []
        self._groups = [self._group_context(batch, *batch.group(g)) for g in range(1 + len(batch.other_groups))]

    def _group_context(self, batch: AttentionBatch, slot_mapping: torch.Tensor, block_tables: torch.Tensor) -> tuple:
        """One KV group's (slot_mapping, decode context, chunk contexts): the decodes' context
        slots with their padding mask, and per longer query (row slice, context slots, first
        query position, context length)."""
        nd, bs = batch.num_decodes, batch.block_size
        device = slot_mapping.device
        decode_ctx = None
        if nd:
            lens = batch.seq_lens_host[:nd]
            max_ctx = int(lens.max())
            offsets = torch.arange(bs, device=device)
            tables = block_tables[:nd, :-(-max_ctx // bs)].long()
            slots = (tables[:, :, None] * bs + offsets).reshape(nd, -1)[:, :max_ctx]
            pos = np.broadcast_to(np.arange(max_ctx), (nd, max_ctx))
            decode_ctx = (slots.contiguous(), self._mask_rows(pos, lens - 1, device))
        chunks = []
        qsl, lens = batch.query_start_loc_host, batch.seq_lens_host
        for b in range(nd, batch.num_seqs):
            start, end, ctx = int(qsl[b]), int(qsl[b + 1]), int(lens[b])
            table = block_tables[b, :-(-ctx // bs)].long()
            slots = (table[:, None] * bs + torch.arange(bs, device=device)).reshape(-1)[:ctx]
            chunks.append((slice(start, end), slots, ctx - (end - start), ctx))
        return slot_mapping, decode_ctx, chunks

    @staticmethod
    def _mask_rows(pos: np.ndarray, last: np.ndarray, device: torch.device) -> torch.Tensor:
        """True where position pos lies past each row's last attended position."""
        return torch.from_numpy(pos > last[:, None]).to(device)

    def forward(self, layer: AttentionLayer, q, k, v) -> torch.Tensor:
        k_cache, v_cache = self.kv_caches[layer.index]
        slot_mapping, decode_ctx, chunks = self._groups[layer.group]
        # A cache may be narrower than the activations (--kv-cache-dtype): stored rounded, read widened.
        bits(k_cache).index_copy_(0, slot_mapping, bits(to_cache(k, k_cache.dtype)))
        bits(v_cache).index_copy_(0, slot_mapping, bits(to_cache(v, v_cache.dtype)))
        out = torch.empty_like(q)
        nd = self.batch.num_decodes
        if nd:
            slots, outside = decode_ctx
            scored = self.batch.scored_rows
            sink = [] if scored is not None and len(scored) else None
            out[:nd] = self._decode(layer, q[:nd], k_cache[slots].to(q.dtype), v_cache[slots].to(q.dtype), outside,
                                    sink)
            if sink:  # [B, KVH, G, C] -> the scored rows' [heads, C]
                logits = sink[0]
                self._logits.append(logits.reshape(logits.shape[0], -1, logits.shape[-1])[torch.from_numpy(scored)])
        for rows, slots, first_pos, ctx in chunks:
            out[rows] = self._chunk(layer, q[rows], k_cache[slots].to(q.dtype), v_cache[slots].to(q.dtype),
                                    first_pos, ctx)
        return out

    def take_decode_logits(self) -> torch.Tensor | None:
        """[layers, scored rows, heads, length] of the last forward pass (-inf past a row's context)."""
        logits, self._logits = self._logits, []
        return torch.stack(logits) if logits else None

    @staticmethod
    def _decode(layer: AttentionLayer, q, keys, values, outside, sink: list | None = None) -> torch.Tensor:
        """q [B, H, D] against keys/values [B, C, KVH, D]; outside [B, C] marks padding. sink, when
        given, receives the masked logits [B, KVH, G, C]."""
        b, h, d = q.shape
        kvh = keys.shape[2]
        qg = q.view(b, kvh, h // kvh, d)  # grouped query heads share one KV head
        scores = torch.matmul(qg, keys.permute(0, 2, 3, 1)).float() * layer.scale  # [B, KVH, G, C]
        if layer.soft_cap is not None:
            scores = layer.soft_cap * torch.tanh(scores / layer.soft_cap)
        if layer.sliding_window is not None:
            c = keys.shape[1]
            last = c - 1 - outside.sum(-1, keepdim=True)  # each row's own position
            outside = outside | (torch.arange(c, device=q.device) <= last - layer.sliding_window)
        scores.masked_fill_(outside[:, None, None, :], float("-inf"))
        if sink is not None:
            sink.append(scores.clone())
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        return torch.matmul(probs, values.transpose(1, 2)).reshape(b, h, d)

    @staticmethod
    def _chunk(layer: AttentionLayer, q, keys, values, first_pos: int, ctx: int) -> torch.Tensor:
        """Queries at positions first_pos.. attending causally to the ctx tokens of keys/values."""
        qlen = q.shape[0]
        qh, kh, vh = q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1)
        if first_pos == 0 and layer.sliding_window is None and layer.soft_cap is None:  # plain causal: SDPA's fast path
            return F.scaled_dot_product_attention(qh.unsqueeze(0), kh.unsqueeze(0), vh.unsqueeze(0), is_causal=True,
                                                  scale=layer.scale, enable_gqa=True).squeeze(0).transpose(0, 1)
        qpos = torch.arange(first_pos, first_pos + qlen, device=q.device)[:, None]
        kpos = torch.arange(ctx, device=q.device)[None, :]
        mask = kpos <= qpos
        if layer.sliding_window is not None:
            mask = mask & (kpos > qpos - layer.sliding_window)
        if layer.soft_cap is None:
            o = F.scaled_dot_product_attention(qh.unsqueeze(0), kh.unsqueeze(0), vh.unsqueeze(0), attn_mask=mask,
                                               scale=layer.scale, enable_gqa=True).squeeze(0)
        else:  # SDPA has no soft cap: the same math written out
            g = qh.shape[0] // kh.shape[0]
            kh, vh = kh.repeat_interleave(g, 0), vh.repeat_interleave(g, 0)
            scores = torch.matmul(qh, kh.transpose(1, 2)).float() * layer.scale
            scores = layer.soft_cap * torch.tanh(scores / layer.soft_cap)
            scores.masked_fill_(~mask, float("-inf"))
            o = torch.matmul(torch.softmax(scores, -1).to(q.dtype), vh)
        return o.transpose(0, 1)
