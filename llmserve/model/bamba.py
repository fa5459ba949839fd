"""Bamba (transformers' BambaForCausalLM): a hybrid of Mamba-2 mixers and attention layers (at
attn_layer_indices), each followed by the Llama MLP. Two kinds of memory serve one request: its
attention layers' KV blocks and its mixers' state slot (model/specs.py). Attention rotates half
of each head (partial_rotary_factor)."""
from __future__ import annotations

from torch import nn

from llmserve.attention.backend import AttentionBackend
from llmserve.model.arch_config import FULL, ArchConfig
from llmserve.model.layers import RMSNorm
from llmserve.model.linear import WeightStorage
from llmserve.model.llama import MLP, Attention, LlamaForCausalLM
from llmserve.model.mamba2 import Mamba2Mixer
from llmserve.model.ops import TorchOps
from llmserve.model.specs import FullAttentionSpec, LayerSpec, MambaStateSpec


class BambaDecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, index: int, storage: WeightStorage) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        kinds = cfg.layer_types[:index]
        if cfg.layer_types[index] == FULL:  # its KV cache counts among the attention layers only
            self.self_attn = Attention(cfg, index, storage, cache_index=kinds.count(FULL))
        else:
            self.mamba = Mamba2Mixer(cfg, index - kinds.count(FULL), storage)
        self.pre_ff_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = MLP(cfg, storage)

    def forward(self, h, residual, cos, sin, backend: AttentionBackend, ops: TorchOps):
        """Returns (this layer's MLP output, the residual stream before it is added)."""
        if residual is None:
            residual, x = h, self.input_layernorm(h)
        else:
            x, residual = ops.add_rms_norm(h, residual, self.input_layernorm)
        mixer = getattr(self, "mamba", None)
        a = mixer(x, backend) if mixer is not None else self.self_attn(x, cos, sin, backend, ops)
        x, residual = ops.add_rms_norm(a, residual, self.pre_ff_layernorm)
        return self.feed_forward(x, ops), residual


class BambaForCausalLM(LlamaForCausalLM):
    layer_class = BambaDecoderLayer

    def kv_cache_specs(self) -> list[LayerSpec]:
        cfg = self.cfg
        return [FullAttentionSpec(cfg.num_kv_heads, cfg.head_dim) for t in cfg.layer_types if t == FULL]

    def state_specs(self) -> list[MambaStateSpec]:
        return [layer.mamba.state_spec() for layer in self.layers if hasattr(layer, "mamba")]
