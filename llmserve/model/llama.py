"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2) over a paged KV cache.

Q/K/V and gate/up are stored fused, so each layer runs two input matmuls instead of five, and
the rotary embedding turns Q and K in one pass. Every op here runs once per layer per step, so
the layer is kept to few, large ops.
"""
from __future__ import annotations

import torch
from torch import nn

from llmserve.attention.backend import AttentionBackend
from llmserve.attention.metadata import AttentionLayer
from llmserve.model.arch_config import ArchConfig
from llmserve.model.decoder_stack import build_decoder_stack
from llmserve.model.layers import RMSNorm, apply_rotary, rotary_tables
from llmserve.model.gguf_quant import BLOCK_FORMATS, BlockEmbedding, GgufLinear
from llmserve.model.linear import Projection, WeightStorage
from llmserve.model.ops import CpuFusedOps, TorchOps
from llmserve.model.rope import rope_cos_sin
from llmserve.model.specs import FullAttentionSpec, LayerSpec


class Attention(nn.Module):
    """norm: the RMSNorm kind of the per-head q/k norms, where the config has them (Qwen3, Gemma 3)."""

    def __init__(self, cfg: ArchConfig, index: int, storage: WeightStorage, norm: type[RMSNorm] = RMSNorm,
                 cache_index: int | None = None) -> None:
        """cache_index: which KV cache is this layer's, where it differs from the layer index
        (a hybrid's attention layers count among themselves)."""
        super().__init__()
        self.rotary_dim = cfg.rotary_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Projection(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.qkv_bias, storage)
        self.o_proj = Projection(self.q_size, cfg.hidden_size, False, storage)
        self.qk_norm = cfg.qk_norm  # a plain flag: hasattr on a module raises inside __getattr__ when absent
        if cfg.qk_norm:
            self.q_norm = norm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = norm(self.head_dim, cfg.rms_norm_eps)
        scale = (cfg.query_pre_attn_scalar or self.head_dim) ** -0.5
        self.layer = AttentionLayer(index if cache_index is None else cache_index, scale, cfg.layer_window(index),
                                    cfg.attn_logit_softcapping)

    def forward(self, x, cos, sin, backend: AttentionBackend, ops: TorchOps) -> torch.Tensor:
        t = x.shape[0]
        h, kvh = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(t, h + 2 * kvh, self.head_dim)
        if self.qk_norm:
            qkv[:, :h] = self.q_norm(qkv[:, :h])
            qkv[:, h:h + kvh] = self.k_norm(qkv[:, h:h + kvh])
        if self.rotary_dim == self.head_dim:
            ops.rotary_(qkv, cos, sin, h + kvh)
        else:  # partial rotary (Bamba): the first rotary_dim dims of each head turn, the rest pass
            qkv[:, :h + kvh, :self.rotary_dim] = apply_rotary(qkv[:, :h + kvh, :self.rotary_dim], cos, sin)
        o = backend.forward(self.layer, qkv[:, :h], qkv[:, h:h + kvh], qkv[:, h + kvh:])
        return self.o_proj(o.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ArchConfig, storage: WeightStorage) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = Projection(cfg.hidden_size, 2 * cfg.intermediate_size, cfg.mlp_bias, storage)
        self.down_proj = Projection(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, storage)
        self.gelu = cfg.hidden_act == "gelu_tanh"

    def forward(self, x: torch.Tensor, ops: TorchOps) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        return self.down_proj(ops.gelu_tanh_mul(gate_up) if self.gelu else ops.silu_mul(gate_up))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, index: int, storage: WeightStorage) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, index, storage)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, storage)

    def forward(self, h, residual, cos, sin, backend, ops: TorchOps):
        """Returns (this layer's MLP output, the residual stream before it is added)."""
        if residual is None:
            residual, x = h, self.input_layernorm(h)
        else:
            x, residual = ops.add_rms_norm(h, residual, self.input_layernorm)
        a = self.self_attn.forward(x, cos, sin, backend, ops)
        x, residual = ops.add_rms_norm(a, residual, self.post_attention_layernorm)
        return self.mlp.forward(x, ops), residual


class LlamaForCausalLM(nn.Module):
    """Built whole from its config: the elementwise ops (TorchOps or fused CPU kernels) and the
    projections' weight storage are chosen here, not swapped in after loading. A family that
    differs in its layers and final norm (Gemma 3) names its own classes."""

    layer_class: type[nn.Module] = DecoderLayer
    norm_class: type[RMSNorm] = RMSNorm

    def __init__(self, cfg: ArchConfig, max_model_len: int, ops: TorchOps | None = None,
                 storage: WeightStorage | None = None) -> None:
        super().__init__()
        storage = storage or WeightStorage()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(self.layer_class(cfg, i, storage) for i in range(cfg.num_layers))
        self.norm = self.norm_class(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Projection(cfg.hidden_size, cfg.vocab_size, False, storage, tied=cfg.tie_word_embeddings)
        self.ops = ops or TorchOps()
        self.max_model_len = max_model_len
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        # The decoder layers as one C++ call where they allow it (model/decoder_stack.py); False
        # keeps the Python layers (tests compare the two, profiles time the parts).
        self.use_decoder_stack = True
        self._stack: object | None = None
        self._stack_built = False

    def kv_cache_specs(self) -> list[LayerSpec]:
        cfg = self.cfg
        return [FullAttentionSpec(cfg.num_kv_heads, cfg.head_dim, cfg.layer_window(i)) for i in range(cfg.num_layers)]

    def process_weights(self) -> None:
        """After loading: every projection hands its float weights to the chosen storage, every
        norm derives what it multiplies by."""
        for module in self.modules():
            if isinstance(module, Projection) and module is not self.lm_head:
                module.process_weights()
            elif isinstance(module, RMSNorm):
                module.finalize()
        self.lm_head.process_weights(self.embed_tokens.weight if self.cfg.tie_word_embeddings else None)
        self._embed_from_blocks()

    def _embed_from_blocks(self) -> None:
        """Where the projections run on a GGUF file's own blocks, so does the embedding lookup
        (sharing the tied head's blocks): the float table is dropped."""
        fmt, blocks = getattr(self.embed_tokens, "source_blocks", None) or (None, None)
        self.embed_tokens.source_blocks = None
        storage = self.lm_head.storage
        if fmt is None or storage.fmt != "auto" or storage.kernels is None or fmt not in BLOCK_FORMATS:
            return
        head, dim = self.lm_head.impl, self.cfg.hidden_size
        if self.cfg.tie_word_embeddings and isinstance(head, GgufLinear) and head.fmt == fmt:
            table = head
        else:
            table = GgufLinear(blocks, fmt, dim, None, storage.kernels)
        self.embed_tokens = BlockEmbedding(table, dim)

    def init_rope(self) -> None:
        """(Re)build the rotary tables on the model's device; the loader calls it after placing weights."""
        cfg = self.cfg
        cos, sin = rope_cos_sin(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, self.max_model_len,
                                cfg.max_position_embeddings)
        device = self.norm.weight.device  # the embedding may have no float table
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        """input_ids/positions: [T]. Returns the final hidden states [T, hidden] (normed)."""
        h = self.embed_tokens(input_ids)
        # transformers rounds cos/sin to the model dtype before rotating; so do we.
        cos, sin = rotary_tables(self.rope_cos[positions].to(h.dtype), self.rope_sin[positions].to(h.dtype))
        stack = self._decoder_stack(backend)
        args = None if stack is None else backend.stack_args()  # None in steps that report attention logits
        if args:
            t = h.shape[0]
            return stack.forward(h, cos.reshape(t, -1), sin.reshape(t, -1), *args)
        residual = None
        # .forward, not __call__: nn.Module's call machinery (hooks, which nothing here registers)
        # is a measurable share of a one-row decode step, three calls a layer.
        for layer in self.layers:
            h, residual = layer.forward(h, residual, cos, sin, backend, self.ops)
        return self.ops.add_rms_norm(h, residual, self.norm)[0]

    def _decoder_stack(self, backend: AttentionBackend):
        if not self.use_decoder_stack or not hasattr(backend, "stack_args"):
            return None
        if not self._stack_built:  # at the first step: the runner sets each layer's KV group after loading
            kernels = self.ops.k if isinstance(self.ops, CpuFusedOps) and type(self).layer_class is DecoderLayer else None
            cfg = self.cfg
            self._stack = build_decoder_stack(kernels, self.layers, self.norm, cfg.num_heads, cfg.num_kv_heads,
                                              cfg.head_dim)
            self._stack_built = True
        return self._stack

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        cap = self.cfg.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
