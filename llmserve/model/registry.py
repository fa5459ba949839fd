"""Architectures by their HF `architectures` name: the module and class that implement each,
imported only when a model of that kind is built. An unknown name is one clear error."""
from __future__ import annotations

import importlib

from llmserve.errors import UnsupportedArchitectureError

# HF name -> (module, class). Mistral, Qwen2 and Qwen3 are Llama-shaped (Qwen2 adds a QKV bias,
# Qwen3 per-head Q/K norms; Mistral's and Qwen2's sliding windows come from the config).
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llmserve.model.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llmserve.model.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("llmserve.model.llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("llmserve.model.llama", "LlamaForCausalLM"),
    "Gemma3ForCausalLM": ("llmserve.model.gemma3", "Gemma3ForCausalLM"),
    "Mamba2ForCausalLM": ("llmserve.model.mamba2", "Mamba2ForCausalLM"),
    "BambaForCausalLM": ("llmserve.model.bamba", "BambaForCausalLM"),
}


def supported_architecture(names: list[str], model_type: str | None = None) -> str:
    """The first of a config's `architectures` names that llmserve serves."""
    for name in names:
        if name in ARCHITECTURES:
            return name
    raise UnsupportedArchitectureError(
        f"unsupported architecture {names or model_type!r}; supported: {sorted(ARCHITECTURES)}")


def model_class(architecture: str) -> type:
    module, cls = ARCHITECTURES[supported_architecture([architecture])]
    return getattr(importlib.import_module(module), cls)
