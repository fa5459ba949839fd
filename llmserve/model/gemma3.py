"""Gemma 3 (text): Llama's attention and MLP with Gemma's differences, written to match
transformers' Gemma3ForCausalLM numerics.

- Local (sliding-window) and global layers interleave (`layer_types`), each kind rotating with
  its own base (and scaling).
- Four norms a layer, each x / rms(x) * (1 + w) in float32 (GemmaRMSNorm): before and after
  attention, before and after the MLP. Q and K are normed per head before the rotation.
- Embeddings are scaled by sqrt(hidden_size); the MLP is GELU-tanh gated; scores are scaled by
  query_pre_attn_scalar ** -0.5; logits and scores may be soft-capped.
"""
from __future__ import annotations

import torch
from torch import nn

from llmserve.attention.backend import AttentionBackend
from llmserve.model.arch_config import SLIDING, ArchConfig
from llmserve.model.layers import GemmaRMSNorm, rotary_tables
from llmserve.model.linear import WeightStorage
from llmserve.model.llama import MLP, Attention, LlamaForCausalLM
from llmserve.model.ops import TorchOps
from llmserve.model.rope import rope_cos_sin


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, index: int, storage: WeightStorage) -> None:
        super().__init__()
        eps = cfg.rms_norm_eps
        self.local = cfg.layer_window(index) is not None
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.self_attn = Attention(cfg, index, storage, norm=GemmaRMSNorm)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.mlp = MLP(cfg, storage)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)

    def forward(self, h, residual, rope, backend, ops: TorchOps):
        """Returns (this layer's normed MLP output, the residual stream before it is added).
        rope: {is_local: (cos, sin)}."""
        if residual is None:
            residual, x = h, self.input_layernorm(h)
        else:
            x, residual = ops.add_rms_norm(h, residual, self.input_layernorm)
        cos, sin = rope[self.local]
        a = self.post_attention_layernorm(self.self_attn.forward(x, cos, sin, backend, ops))
        x, residual = ops.add_rms_norm(a, residual, self.pre_feedforward_layernorm)
        return self.post_feedforward_layernorm(self.mlp.forward(x, ops)), residual


class Gemma3ForCausalLM(LlamaForCausalLM):
    layer_class = Gemma3DecoderLayer
    norm_class = GemmaRMSNorm

    def __init__(self, cfg: ArchConfig, max_model_len: int, ops: TorchOps | None = None,
                 storage: WeightStorage | None = None) -> None:
        super().__init__(cfg, max_model_len, ops, storage)
        self.register_buffer("local_cos", torch.empty(0), persistent=False)  # the sliding layers' tables
        self.register_buffer("local_sin", torch.empty(0), persistent=False)

    def init_rope(self) -> None:
        cfg = self.cfg
        device = self.norm.weight.device  # the embedding may have no float table
        cos, sin = rope_cos_sin(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, self.max_model_len,
                                cfg.max_position_embeddings)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)
        if SLIDING in cfg.layer_types:
            theta = cfg.local_rope_theta if cfg.local_rope_theta is not None else cfg.rope_theta
            cos, sin = rope_cos_sin(cfg.head_dim, theta, cfg.local_rope_scaling, self.max_model_len,
                                    cfg.max_position_embeddings)
            self.local_cos, self.local_sin = cos.to(device), sin.to(device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        # transformers multiplies by sqrt(hidden) rounded to the model dtype
        h = h * torch.tensor(self.cfg.hidden_size ** 0.5, dtype=h.dtype)
        rope = {False: rotary_tables(self.rope_cos[positions].to(h.dtype), self.rope_sin[positions].to(h.dtype))}
        if self.local_cos.numel():
            rope[True] = rotary_tables(self.local_cos[positions].to(h.dtype), self.local_sin[positions].to(h.dtype))
        residual = None
        for layer in self.layers:
            h, residual = layer.forward(h, residual, rope, backend, self.ops)  # as LlamaForCausalLM
        return self.ops.add_rms_norm(h, residual, self.norm)[0]
