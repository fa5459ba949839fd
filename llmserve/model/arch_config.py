"""The architecture facts the model code needs, read from an HF config.json."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmserve.errors import ModelLoadError, UnsupportedArchitectureError
from llmserve.model.registry import supported_architecture

FULL, SLIDING = "full_attention", "sliding_attention"
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


@dataclass(frozen=True)
class ArchConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    mlp_bias: bool
    hidden_act: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    sliding_window: int | None = None  # the window of the layers whose type is SLIDING
    layer_types: tuple[str, ...] = ()  # FULL or SLIDING per layer (empty: all FULL)
    qk_norm: bool = False  # RMSNorm over each head of q and k before the rotation (Qwen3, Gemma 3)
    # Gemma 3: sliding layers rotate with their own base and scaling; scores are scaled by
    # query_pre_attn_scalar ** -0.5; logits (and attention scores) may be soft-capped.
    local_rope_theta: float | None = None
    local_rope_scaling: dict[str, Any] | None = None
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None

    def layer_window(self, index: int) -> int | None:
        """The sliding window of layer `index`, or None where it attends to the whole context."""
        return self.sliding_window if self.layer_types and self.layer_types[index] == SLIDING else None

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ArchConfig":
        archs = cfg.get("architectures") or []
        arch = supported_architecture(archs, cfg.get("model_type"))
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        act = cfg.get("hidden_activation") or cfg.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise UnsupportedArchitectureError(f"unsupported activation {act!r}")
        gemma3 = arch == "Gemma3ForCausalLM"
        num_layers = cfg["num_hidden_layers"]
        params = cfg.get("rope_parameters")
        if isinstance(params, dict) and FULL in params:  # transformers 5: one set per layer type
            rope_theta, rope_scaling = _rope(params[FULL], None, None)
            local_theta, local_scaling = _rope(params.get(SLIDING, {}), None, None)
        else:  # transformers 5 folds rope_theta into `rope_parameters`; older configs have both apart
            rope_theta, rope_scaling = _rope(params if isinstance(params, dict) else {}, cfg.get("rope_theta"),
                                             cfg.get("rope_scaling"))
            local_theta, local_scaling = cfg.get("rope_local_base_freq"), None
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or hidden // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            hidden_act=ACTIVATIONS[act],
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=cfg.get("sliding_window"),
            layer_types=_layer_types(cfg, arch, num_layers),
            qk_norm=gemma3 or arch == "Qwen3ForCausalLM",
            local_rope_theta=float(local_theta) if gemma3 and local_theta is not None else None,
            local_rope_scaling=local_scaling if gemma3 else None,
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar") if gemma3 else None,
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            attn_logit_softcapping=cfg.get("attn_logit_softcapping"),
        )

    @classmethod
    def from_folder(cls, folder: Path) -> "ArchConfig":
        path = Path(folder) / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelLoadError(f"model folder has no config.json: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"config.json is not valid JSON: {path} ({e.__class__.__name__})") from None
        try:
            return cls.from_dict(cfg)
        except KeyError as e:
            raise ModelLoadError(f"config.json lacks required field {e.args[0]!r}: {path}") from None


def _rope(params: dict[str, Any], theta: float | None, scaling: dict[str, Any] | None,
          ) -> tuple[float, dict[str, Any] | None]:
    """(base, scaling or None) from one rope parameter set and the older separate fields."""
    theta = params.get("rope_theta", theta)
    if params.get("rope_type", "default") != "default":
        scaling = params
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return float(theta if theta is not None else 10000.0), scaling


def _layer_types(cfg: dict[str, Any], arch: str, num_layers: int) -> tuple[str, ...]:
    """Which layers attend through the sliding window, as transformers decides it."""
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if types:
        if len(types) != num_layers or any(t not in (FULL, SLIDING) for t in types):
            raise UnsupportedArchitectureError(f"unsupported layer_types (one of {FULL!r} or {SLIDING!r} per layer)")
    elif arch == "MistralForCausalLM":  # every layer, whenever a window is set
        types = [SLIDING if window else FULL] * num_layers
    elif cfg.get("use_sliding_window"):  # Qwen2 before layer_types: the layers from max_window_layers on
        first = cfg.get("max_window_layers", num_layers)
        types = [SLIDING if i >= first else FULL for i in range(num_layers)]
    else:
        types = [FULL] * num_layers
    if SLIDING in types and not window:
        raise UnsupportedArchitectureError("sliding-attention layers without a sliding_window size")
    return tuple(types) if SLIDING in types else ()
