"""A Llama model's decoder layers handed to one C++ call (csrc/decoder_stack.cpp).

The stack calls the kernels the Python layers call, in their order, with the same tensors, so its
hidden states are the Python path's bit for bit (a test holds it to that). It takes the plain Llama
layer only (fused QKV with full rotary, SiLU MLP, RMSNorm) over GGUF projections on the CPU kernels,
which is what the embedded model and every GGUF Llama-family file load as; anything else (float
weights, Qwen3's per-head norms, Gemma 3's layers, mixed-format shards) keeps the Python layers.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from llmserve.model.gguf_quant import _KERNEL_FORMAT, _Q8_KERNEL_FORMAT, Q8_AUTO_PATH, GgufLinear
from llmserve.model.layers import RMSNorm


def _projection(kernels, proj: nn.Module):
    impl = getattr(proj, "impl", None)
    if not isinstance(impl, GgufLinear) or impl.kernels is not kernels:
        return None
    if impl.tiles is not None:  # q8, or exact over the same tiles
        return kernels.StackProjection(impl.tiles, impl.bias, _Q8_KERNEL_FORMAT[impl.fmt], impl.out_features,
                                       impl.activations == "q8", Q8_AUTO_PATH, tiles=True)
    if impl.fmt not in _KERNEL_FORMAT:
        return None
    return kernels.StackProjection(impl.blocks, impl.bias, _KERNEL_FORMAT[impl.fmt], impl.out_features, False,
                                   Q8_AUTO_PATH)


def _plain_norm(norm: nn.Module) -> bool:
    return type(norm) is RMSNorm and norm.weight.dtype == torch.float32 and norm.weight.is_contiguous()


def build_decoder_stack(kernels, layers: Iterable[nn.Module], final_norm: nn.Module, num_heads: int,
                        num_kv_heads: int, head_dim: int):
    """The layers as one kernels.DecoderStack, or None where any of them is not a plain Llama layer
    over GGUF projections (or the kernels predate the stack)."""
    if kernels is None or not hasattr(kernels, "DecoderStack") or not _plain_norm(final_norm):
        return None
    stack = kernels.DecoderStack(num_heads, num_kv_heads, head_dim, final_norm.weight, final_norm.eps)
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qk_norm or attn.rotary_dim != attn.head_dim or mlp.gelu:
            return None
        if not (_plain_norm(layer.input_layernorm) and _plain_norm(layer.post_attention_layernorm)):
            return None
        projections = [_projection(kernels, p) for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        if any(p is None for p in projections):
            return None
        spec = attn.layer
        stack.add_layer(kernels.StackLayer(
            layer.input_layernorm.weight, layer.input_layernorm.eps,
            layer.post_attention_layernorm.weight, layer.post_attention_layernorm.eps, *projections,
            spec.index, spec.group, spec.scale, spec.sliding_window or 0, spec.soft_cap or 0.0))
    return stack if stack.num_layers else None
