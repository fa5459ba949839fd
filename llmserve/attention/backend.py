"""Attention over the paged KV cache. One interface; the torch backend is the reference."""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from llmserve.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KVH, D], caches: [num_slots, KVH, D]. Writes the new K/V into the
        caches at meta.slot_mapping and returns the attention output [T, H, D].

        All of the step's K/V must be written before any attention reads the cache: a request
        admitted this step may hit prefix blocks that another request fills in the same step."""
        ...


class TorchAttention:
    """Batched attention in plain PyTorch: all decodes in one grouped matmul, each prefill chunk
    through scaled_dot_product_attention with a causal mask offset by its cached prefix."""

    def __call__(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        nd = meta.num_decode_tokens
        if nd:
            out[:nd] = self._decode(q[:nd], k_cache, v_cache, meta, scale)
        self._prefills(out, q, k, v, k_cache, v_cache, meta, scale)
        return out

    def _prefills(self, out, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> None:
        """Each prefill chunk's attention into its rows of out (the caches already hold its K/V)."""
        for p in meta.prefills:
            sl = slice(p.query_start, p.query_start + p.query_len)
            out[sl] = self._prefill(q[sl], k[sl], v[sl], k_cache, v_cache, p.context_slots, scale)

    @staticmethod
    def _decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        b, h, d = q.shape
        kvh = k_cache.shape[1]
        slots, outside = meta.decode_context()
        keys = k_cache[slots]  # [B, C, KVH, D]
        values = v_cache[slots]
        qg = q.view(b, kvh, h // kvh, d)  # grouped query heads share one KV head
        scores = torch.matmul(qg, keys.permute(0, 2, 3, 1)).float() * scale  # [B, KVH, G, C]
        scores.masked_fill_(outside[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        return torch.matmul(probs, values.transpose(1, 2)).reshape(b, h, d)

    @staticmethod
    def _prefill(q, k, v, k_cache, v_cache, context_slots, scale: float) -> torch.Tensor:
        qlen = q.shape[0]
        if context_slots is None:  # no cached prefix: attend to the new tokens, plain causal
            keys, values, mask, causal = k, v, None, True
        else:
            keys, values = k_cache[context_slots], v_cache[context_slots]
            ctx = keys.shape[0]
            qpos = torch.arange(ctx - qlen, ctx, device=q.device)
            mask = torch.arange(ctx, device=q.device)[None, :] <= qpos[:, None]
            causal = False
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0),
            attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
        return o.squeeze(0).transpose(0, 1)
