"""The architecture facts the model code needs, read from an HF config.json."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmserve.errors import ModelLoadError, UnsupportedArchitectureError
from llmserve.model.registry import supported_architecture

FULL, SLIDING, MAMBA = "full_attention", "sliding_attention", "mamba"
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


@dataclass(frozen=True)
class MambaConfig:
    """A Mamba-2 mixer's shape (transformers' Mamba2Config names)."""
    num_heads: int
    head_dim: int
    state_size: int
    n_groups: int
    conv_kernel: int
    chunk_size: int
    use_conv_bias: bool
    use_bias: bool
    time_step_limit: tuple[float, float]

    @property
    def intermediate_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.intermediate_size + 2 * self.n_groups * self.state_size


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
    layer_types: tuple[str, ...] = ()  # FULL, SLIDING or MAMBA per layer (empty: all FULL)
    qk_norm: bool = False  # RMSNorm over each head of q and k before the rotation (Qwen3, Gemma 3)
    # Gemma 3: sliding layers rotate with their own base and scaling; scores are scaled by
    # query_pre_attn_scalar ** -0.5; logits (and attention scores) may be soft-capped.
    local_rope_theta: float | None = None
    local_rope_scaling: dict[str, Any] | None = None
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    mamba: MambaConfig | None = None  # the state-space mixers' shape (Mamba-2, Bamba)
    partial_rotary_factor: float = 1.0  # the share of each head's dims that rotate (Bamba: half)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_mamba(self, index: int) -> bool:
        return self.mamba is not None and (not self.layer_types or self.layer_types[index] == MAMBA)

    def layer_window(self, index: int) -> int | None:
        """The sliding window of layer `index`, or None where it attends to the whole context."""
        return self.sliding_window if self.layer_types and self.layer_types[index] == SLIDING else None

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ArchConfig":
        archs = cfg.get("architectures") or []
        arch = supported_architecture(archs, cfg.get("model_type"))
        if arch == "Mamba2ForCausalLM":
            return cls._from_mamba2(cfg, arch)
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
        bamba = arch == "BambaForCausalLM"
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
            layer_types=_bamba_layer_types(cfg, num_layers) if bamba else _layer_types(cfg, arch, num_layers),
            qk_norm=gemma3 or arch == "Qwen3ForCausalLM",
            local_rope_theta=float(local_theta) if gemma3 and local_theta is not None else None,
            local_rope_scaling=local_scaling if gemma3 else None,
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar") if gemma3 else None,
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            attn_logit_softcapping=cfg.get("attn_logit_softcapping"),
            mamba=_mamba({k.removeprefix("mamba_"): v for k, v in cfg.items()}, bamba=True) if bamba else None,
            partial_rotary_factor=float((params if isinstance(params, dict) else {}).get(
                "partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))),
        )

    @classmethod
    def _from_mamba2(cls, cfg: dict[str, Any], arch: str) -> "ArchConfig":
        hidden = cfg["hidden_size"]
        mamba = _mamba(cfg)
        if mamba.intermediate_size != int(cfg.get("expand", 2) * hidden):
            raise UnsupportedArchitectureError(
                f"Mamba-2 num_heads x head_dim ({mamba.intermediate_size}) must equal expand x hidden_size")
        eos = cfg.get("eos_token_id")
        act = cfg.get("hidden_act", "silu")
        if act not in ACTIVATIONS or ACTIVATIONS[act] != "silu":
            raise UnsupportedArchitectureError(f"unsupported Mamba-2 activation {act!r}")
        return cls(
            architecture=arch, vocab_size=cfg["vocab_size"], hidden_size=hidden,
            intermediate_size=mamba.intermediate_size, num_layers=cfg["num_hidden_layers"], num_heads=0,
            num_kv_heads=0, head_dim=0, rms_norm_eps=cfg.get("layer_norm_epsilon", 1e-5), rope_theta=10000.0,
            rope_scaling=None, max_position_embeddings=cfg.get("max_position_embeddings", 1 << 20),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), qkv_bias=False,
            mlp_bias=mamba.use_bias, hidden_act="silu", bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)), mamba=mamba)

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


def _mamba(cfg: dict[str, Any], bamba: bool = False) -> MambaConfig:
    """A mixer's shape from Mamba2Config's names, or Bamba's (its mamba_* keys, prefix removed)."""
    names = dict(num_heads="n_heads", head_dim="d_head", state_size="d_state", conv_kernel="d_conv",
                 use_conv_bias="conv_bias", use_bias="proj_bias") if bamba else {}
    cfg = {key: cfg[names.get(key, key)] for key in (
        "num_heads", "head_dim", "state_size", "n_groups", "conv_kernel", "chunk_size", "use_conv_bias", "use_bias",
        "time_step_limit") if names.get(key, key) in cfg}
    mamba = MambaConfig(
        num_heads=cfg["num_heads"], head_dim=cfg["head_dim"], state_size=cfg["state_size"],
        # (transformers' defaults where a config leaves a key out: Mamba2Config's n_groups is 8, Bamba's 1)
        n_groups=cfg.get("n_groups", 1 if bamba else 8), conv_kernel=cfg.get("conv_kernel", 4),
        chunk_size=cfg.get("chunk_size", 256),
        use_conv_bias=bool(cfg.get("use_conv_bias", True)), use_bias=bool(cfg.get("use_bias", False)),
        time_step_limit=tuple(_json_float(x) for x in cfg.get("time_step_limit", (0.0, float("inf")))))
    if mamba.num_heads % mamba.n_groups:
        raise UnsupportedArchitectureError(f"Mamba-2 num_heads {mamba.num_heads} is no multiple of n_groups {mamba.n_groups}")
    return mamba


def _json_float(value: Any) -> float:
    """A float of config.json, where transformers writes infinity as {"__float__": "Infinity"}."""
    return float(value["__float__"] if isinstance(value, dict) else value)


def _rope(params: dict[str, Any], theta: float | None, scaling: dict[str, Any] | None,
          ) -> tuple[float, dict[str, Any] | None]:
    """(base, scaling or None) from one rope parameter set and the older separate fields."""
    theta = params.get("rope_theta", theta)
    if params.get("rope_type", "default") != "default":
        scaling = params
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return float(theta if theta is not None else 10000.0), scaling


def _bamba_layer_types(cfg: dict[str, Any], num_layers: int) -> tuple[str, ...]:
    """Bamba: attention at attn_layer_indices, Mamba-2 mixers elsewhere."""
    attention = set(cfg.get("attn_layer_indices") or ())
    if any(not 0 <= i < num_layers for i in attention):
        raise UnsupportedArchitectureError(f"attn_layer_indices outside the {num_layers} layers")
    return tuple(FULL if i in attention else MAMBA for i in range(num_layers))


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
