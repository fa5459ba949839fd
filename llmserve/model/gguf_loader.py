"""Turn one GGUF file into a Hugging Face model folder, cached by the file's sha256.

The model loader reads HF folders only (config.json, model.safetensors, tokenizer files), so a
GGUF is converted once into `<cache_dir>/gguf/<sha256>/` and every later start reuses that folder.
Weights are dequantized to float32 exactly as `gguf.quants.dequantize` does; the tokenizer is built
by transformers' own GGUF tokenizer conversion, so it encodes exactly as
`AutoTokenizer.from_pretrained(dir, gguf_file=name)` does.

Layout of a converted folder:
    config.json, generation_config.json, model.safetensors, llmserve/gguf_blocks.safetensors (the file's
    quantized tensors as published, which `--quantization auto` computes with),
    tokenizer.json, tokenizer_config.json (+ chat_template.jinja), llmserve_gguf.json (written last)
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmserve.errors import ModelLoadError, UnsupportedArchitectureError

logger = logging.getLogger(__name__)

# Bump when the folder contents change meaning, so stale caches are rebuilt instead of reused.
# 2: the file's quantized blocks are kept beside the float weights; 3: in a subfolder, so other
# engines that load every top-level *.safetensors (vLLM, transformers) see only the float weights.
CONVERTER_VERSION = 3
_MARKER = "llmserve_gguf.json"
# The file's tensors in the block formats llmserve computes with, as uint8 [rows, bytes] under
# their HF names, the format of each in the metadata: `--quantization auto` runs on them as published.
BLOCKS_FILE = "llmserve/gguf_blocks.safetensors"
_REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                   "tokenizer_config.json", BLOCKS_FILE, _MARKER)
_HASH_INDEX = "hash_index.json"

# GGUF general.architecture -> (HF architectures entry, HF model_type)
SUPPORTED_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
}
# convert_hf_to_gguf permutes attn_q/attn_k rows (rope layout) for llama only; transformers'
# TENSOR_PROCESSORS agrees: qwen2 tensors are stored as in the HF checkpoint.
_PERMUTED_ARCHITECTURES = {"llama"}

_SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Per architecture: names that differ from llama's or that llama lacks.
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_ARCH_BLOCK_NAMES = {
    "qwen3": {**_BLOCK_NAMES, **_QK_NORMS},
    "gemma3": {**_BLOCK_NAMES, **_QK_NORMS, "post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"},
}
# llama.cpp's converter stores Gemma's norm weights as 1 + w (its graph multiplies by them as they
# are); transformers' GGUF loader subtracts the 1 again, and so do we.
_SHIFTED_NORMS = {"gemma3"}
# Gemma 3 in llama.cpp: every 6th layer global, the rest local with base 10000; the 27B model
# scales scores by (hidden / heads) ** -0.5, the others by head_dim ** -0.5.
_GEMMA3_GLOBAL_EVERY, _GEMMA3_LOCAL_BASE, _GEMMA3_27B_LAYERS = 6, 10000.0, 62
# Gemma's turn format, for files that carry no chat template (the system prompt opens the first
# user turn, as Gemma's own template does).
_GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set sys = '' %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set sys = m['content'] + '\n\n' %}{% continue %}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if loop.first or (loop.index0 == 1 and messages[0]['role'] == 'system') %}{{ sys }}{% endif %}"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
_DEFAULT_CHAT_TEMPLATES = {"gemma3": _GEMMA_CHAT_TEMPLATE}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_ROPE_FREQS = "rope_freqs.weight"
# llama.cpp's converter assumes this original context for llama3 rope when the file does not say.
_LLAMA3_DEFAULT_ORIG_CTX = 8192


def default_cache_dir() -> Path:
    """`$LLMSERVE_CACHE_DIR`, else the per-user cache directory."""
    env = os.environ.get("LLMSERVE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("llmserve"))


def gguf_to_hf_folder(gguf_path: str | Path, cache_dir: Path | None = None) -> Path:
    """The HF folder converted from `gguf_path`, converting it on first use."""
    path = _existing_file(gguf_path)
    root = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "gguf"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(f"cannot create the model cache directory {root}: {e.strerror}") from e
    digest = _file_sha256(path, root)
    folder = root / digest
    if _is_complete(folder):
        return folder
    return _convert_atomically(path, folder, digest)


# ---------------------------------------------------------------------------------------------
# cache: hashing, completeness, atomic publication


def _existing_file(gguf_path: str | Path) -> Path:
    path = Path(gguf_path).expanduser()
    if path.is_dir():
        raise ModelLoadError(f"expected a GGUF file but got a directory: {path}")
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    return path.resolve()


def _file_sha256(path: Path, root: Path) -> str:
    """sha256 of the file, memoized by (path, size, mtime) so large files are hashed once."""
    stat = path.stat()
    key = str(path)
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    index = _read_json(root / _HASH_INDEX) or {}
    entry = index.get(key)
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in stamp.items()) and entry.get("sha256"):
        return entry["sha256"]
    try:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise ModelLoadError(f"cannot read GGUF file {path}: {e.strerror}") from e
    index = _read_json(root / _HASH_INDEX) or {}  # re-read: another process may have added entries
    index[key] = {**stamp, "sha256": digest}
    _write_json_atomically(root / _HASH_INDEX, index)
    return digest


def _is_complete(folder: Path) -> bool:
    marker = _read_json(folder / _MARKER)
    return (marker is not None and marker.get("converter_version") == CONVERTER_VERSION
            and all((folder / name).is_file() for name in _REQUIRED_FILES))


def _convert_atomically(path: Path, folder: Path, digest: str) -> Path:
    """Convert into a temp dir beside `folder`, then rename it into place."""
    start = time.perf_counter()
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}.", suffix=".tmp", dir=folder.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; a shared cache dir should stay readable
    except OSError as e:
        raise ModelLoadError(f"cannot write the converted model under {folder.parent}: {e.strerror}") from e
    try:
        num_tensors = _convert(path, tmp)
        _write_json(tmp / _MARKER, {"converter_version": CONVERTER_VERSION, "sha256": digest,
                                    "source_name": path.name})
        _publish(tmp, folder)
    except OSError as e:  # disk full, permissions: name the place, not a bare errno
        raise ModelLoadError(f"cannot write the converted model under {folder.parent}: {e.strerror}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only still there if conversion or publication failed
    logger.info("converted GGUF %s (%d tensors) to %s in %.1f s", path.name, num_tensors, folder,
                time.perf_counter() - start)
    return folder


def _publish(tmp: Path, folder: Path) -> None:
    try:
        os.rename(tmp, folder)
        return
    except OSError:
        if _is_complete(folder):
            return  # a concurrent conversion of the same file won the race; its folder is equivalent
    # A stale or partial folder is in the way: move it aside, then retry once.
    trash = Path(tempfile.mkdtemp(prefix=f".{folder.name[:16]}.", suffix=".old", dir=folder.parent))
    try:
        os.rename(folder, trash / "old")
        os.rename(tmp, folder)
    except OSError as e:
        if not _is_complete(folder):
            raise ModelLoadError(f"cannot publish converted model to {folder}: {e.strerror}") from e
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_json_atomically(path: Path, value: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)  # the index is only a cache; losing a write is harmless


# ---------------------------------------------------------------------------------------------
# conversion


@dataclass(frozen=True)
class _Hparams:
    arch: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int


@dataclass(frozen=True)
class _TensorPlan:
    hf_name: str
    shape: tuple[int, ...]  # PyTorch order: [out, in]
    load: Callable[[], np.ndarray]


def _convert(path: Path, out: Path) -> int:
    """Write config, weights and tokenizer of `path` into `out`; returns the tensor count."""
    reader = _open_reader(path)
    arch = _require(reader, path, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"GGUF architecture {arch!r} of {path} is not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
    tensors = {t.name: t for t in reader.tensors}
    hp = _hparams(reader, path, arch, tensors)
    plans = _tensor_plans(path, hp, tensors)  # validates names and types before any heavy work
    config = _hf_config(reader, path, hp, tensors)
    _write_safetensors(out / "model.safetensors", plans, path)
    _write_blocks(out / BLOCKS_FILE, path, hp, tensors)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", _generation_config(config))
    _write_tokenizer(path, out, _field(reader, "tokenizer.chat_template") or _DEFAULT_CHAT_TEMPLATES.get(arch))
    return len(plans)


def _open_reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # GGUFReader raises assorted errors on bad input (ValueError, struct, numpy...)
        raise ModelLoadError(f"not a valid GGUF file (corrupt or truncated): {path} ({type(e).__name__})") from e


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _require(reader, path: Path, key: str) -> Any:
    value = _field(reader, key)
    if value is None:
        raise ModelLoadError(f"GGUF file {path} lacks required metadata key {key!r}")
    return value


def _hparams(reader, path: Path, arch: str, tensors: dict[str, Any]) -> _Hparams:
    num_heads = int(_require(reader, path, f"{arch}.attention.head_count"))
    q = tensors.get("blk.0.attn_q.weight")
    if q is None:
        raise ModelLoadError(f"GGUF file {path} has no tensor 'blk.0.attn_q.weight'")
    # The q projection's rows are num_heads * head_dim, whatever the metadata claims about rope dims.
    head_dim = int(q.shape[1]) // num_heads
    embed = tensors.get("token_embd.weight")
    vocab = _field(reader, f"{arch}.vocab_size") or (int(embed.shape[1]) if embed is not None else None)
    if vocab is None:
        raise ModelLoadError(f"GGUF file {path} states no vocabulary size and has no token_embd.weight")
    return _Hparams(
        arch=arch,
        num_layers=int(_require(reader, path, f"{arch}.block_count")),
        hidden_size=int(_require(reader, path, f"{arch}.embedding_length")),
        intermediate_size=int(_require(reader, path, f"{arch}.feed_forward_length")),
        num_heads=num_heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        vocab_size=int(vocab),
    )


def _hf_name(gguf_name: str, num_layers: int, arch: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    names = _ARCH_BLOCK_NAMES.get(arch, _BLOCK_NAMES)
    m = _BLOCK_RE.match(gguf_name)
    if m is None or m.group(2) not in names or int(m.group(1)) >= num_layers:
        return None
    return f"model.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"


def _tensor_plans(path: Path, hp: _Hparams, tensors: dict[str, Any]) -> list[_TensorPlan]:
    plans = []
    for name, tensor in tensors.items():
        if name == _ROPE_FREQS:
            continue  # folded into config.json's rope_scaling
        hf_name = _hf_name(name, hp.num_layers, hp.arch)
        if hf_name is None:
            raise ModelLoadError(f"GGUF file {path} has tensor {name!r}, which the {hp.arch} loader does not know")
        type_name = _type_name(tensor.tensor_type)
        if type_name not in _SUPPORTED_TYPES:
            raise ModelLoadError(f"GGUF tensor {name!r} in {path} has type {type_name}, which llmserve cannot "
                                 f"dequantize; supported: {sorted(_SUPPORTED_TYPES)}")
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        heads = _permuted_heads(name, hp)
        shift = hp.arch in _SHIFTED_NORMS and hf_name.endswith("norm.weight")
        plans.append(_TensorPlan(hf_name, shape, _loader(path, tensor, shape, heads, shift)))
    _check_complete(path, hp, {p.hf_name for p in plans})
    return plans


def _type_name(tensor_type: Any) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(int(tensor_type)).name
    except ValueError:
        return f"unknown({int(tensor_type)})"


def _permuted_heads(gguf_name: str, hp: _Hparams) -> int | None:
    """How many heads llama.cpp permuted this tensor's rows over, or None if it did not."""
    if hp.arch not in _PERMUTED_ARCHITECTURES:
        return None
    if ".attn_q." in gguf_name:
        return hp.num_heads
    if ".attn_k." in gguf_name:
        return hp.num_kv_heads
    return None


def _check_complete(path: Path, hp: _Hparams, names: set[str]) -> None:
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{part}.weight" for i in range(hp.num_layers)
        for part in _ARCH_BLOCK_NAMES.get(hp.arch, _BLOCK_NAMES).values()}
    missing = sorted(expected - names)
    if missing:
        raise ModelLoadError(f"GGUF file {path} lacks {len(missing)} tensors the {hp.arch} model needs, "
                             f"e.g. {missing[0]!r}")


def _loader(path: Path, tensor: Any, shape: tuple[int, ...], heads: int | None,
            norm_shift: bool = False) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        w = _dequantize(path, tensor, shape)
        if norm_shift:
            w = w - np.float32(1.0)
        return _unpermute(w, heads) if heads is not None else w
    return load


def _dequantize(path: Path, tensor: Any, shape: tuple[int, ...]) -> np.ndarray:
    import gguf

    try:
        w = gguf.quants.dequantize(tensor.data, gguf.GGMLQuantizationType(int(tensor.tensor_type)))
        return np.ascontiguousarray(w, dtype=np.float32).reshape(shape)
    except Exception as e:
        raise ModelLoadError(f"cannot dequantize GGUF tensor {tensor.name!r} ({_type_name(tensor.tensor_type)}) "
                             f"of {path}: {type(e).__name__}") from e


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's permute: rows [h, 2, d/2] were stored as [h, d/2, 2]."""
    rest = w.shape[1:]
    half = w.shape[0] // n_head // 2
    return np.ascontiguousarray(w.reshape(n_head, half, 2, *rest).swapaxes(1, 2).reshape(w.shape))


# ---------------------------------------------------------------------------------------------
# config.json / generation_config.json


def _f32(value: float) -> float:
    """A float32 metadata value as its shortest decimal, e.g. 1e-05 rather than 9.999999747e-06."""
    return float(str(np.float32(value)))


def _hf_config(reader, path: Path, hp: _Hparams, tensors: dict[str, Any]) -> dict[str, Any]:
    arch = hp.arch
    hf_arch, model_type = SUPPORTED_ARCHITECTURES[arch]
    rope_theta = _f32(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hp.hidden_size,
        "intermediate_size": hp.intermediate_size,
        "num_hidden_layers": hp.num_layers,
        "num_attention_heads": hp.num_heads,
        "num_key_value_heads": hp.num_kv_heads,
        "head_dim": hp.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(_require(reader, path, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "max_position_embeddings": int(_require(reader, path, f"{arch}.context_length")),
        "vocab_size": hp.vocab_size,
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": False,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _eos_token_ids(reader, arch),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    rope_scaling = _rope_scaling(reader, path, hp, tensors, rope_theta)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    if arch == "gemma3":
        config.update(_gemma3_config(reader, hp, rope_theta, rope_scaling))
    return config


def _gemma3_config(reader, hp: _Hparams, rope_theta: float, rope_scaling: dict[str, Any] | None) -> dict[str, Any]:
    """What llama.cpp fixes for Gemma 3 rather than storing it, in transformers' config terms."""
    layer_types = ["full_attention" if (i + 1) % _GEMMA3_GLOBAL_EVERY == 0 else "sliding_attention"
                   for i in range(hp.num_layers)]
    scalar = hp.hidden_size // hp.num_heads if hp.num_layers == _GEMMA3_27B_LAYERS else hp.head_dim
    full = {"rope_type": "default", "rope_theta": rope_theta, **(rope_scaling or {})}
    return {
        "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": int(_field(reader, "gemma3.attention.sliding_window", 512)),
        "layer_types": layer_types, "query_pre_attn_scalar": scalar,
        "rope_parameters": {"full_attention": full,
                            "sliding_attention": {"rope_type": "default", "rope_theta": _GEMMA3_LOCAL_BASE}},
        "final_logit_softcapping": None, "attn_logit_softcapping": None,
    }


def _eos_token_ids(reader, arch: str = "") -> int | list[int] | None:
    """eos, plus end-of-turn tokens (Llama 3's <|eot_id|>, Gemma's <end_of_turn> where the file does
    not name it) that must also stop generation."""
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        value = _field(reader, key)
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    if arch == "gemma3" and _field(reader, "tokenizer.ggml.eot_token_id") is None:
        tokens = reader.get_field("tokenizer.ggml.tokens")
        if tokens is not None:
            for i, part in enumerate(tokens.data):  # indices of each string's bytes, in order
                if bytes(tokens.parts[part]) == b"<end_of_turn>":
                    ids.append(i)
                    break
    return None if not ids else ids[0] if len(ids) == 1 else ids


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: config[k] for k in keys if config.get(k) is not None}


def _rope_scaling(reader, path: Path, hp: _Hparams, tensors: dict[str, Any],
                  rope_theta: float) -> dict[str, Any] | None:
    prefix = f"{hp.arch}.rope.scaling."
    orig_ctx = _field(reader, prefix + "original_context_length")
    if _ROPE_FREQS in tensors:
        # llama3-style scaling: llama.cpp stores per-frequency divisors instead of parameters.
        factors = _dequantize(path, tensors[_ROPE_FREQS], (hp.head_dim // 2,))
        return _llama3_rope_scaling(factors, hp.head_dim, rope_theta,
                                    int(orig_ctx or _LLAMA3_DEFAULT_ORIG_CTX), path)
    kind = _field(reader, prefix + "type")
    if kind is None or kind == "none":
        return None
    factor = _f32(_require(reader, path, prefix + "factor"))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": factor}
        if orig_ctx is not None:
            scaling["original_max_position_embeddings"] = int(orig_ctx)
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            value = _field(reader, prefix + gguf_key)
            if value is not None:
                scaling[hf_key] = _f32(value)
        return scaling
    raise ModelLoadError(f"GGUF file {path} uses rope scaling {kind!r}, which llmserve does not support")


def _llama3_rope_scaling(factors: np.ndarray, head_dim: int, rope_theta: float, orig_ctx: int,
                         path: Path) -> dict[str, Any] | None:
    """Recover HF's llama3 rope parameters from llama.cpp's per-frequency divisors.

    Divisors are 1 for short wavelengths, `factor` for long ones, and in between
    1/f = (1 - s)/factor + s with s = (orig_ctx/wavelen - low)/(high - low): affine in
    orig_ctx/wavelen, so two in-between points fix low and high. Only their ratio to orig_ctx
    matters, so the result reproduces the same frequencies whatever orig_ctx is assumed.
    """
    f = factors.astype(np.float64)
    factor = float(f.max())
    if np.allclose(f, 1.0):
        return None
    inv_freq = rope_theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    ratio = orig_ctx * inv_freq / (2 * math.pi)  # orig_ctx / wavelength
    mid = (f > 1 + 1e-4) & (f < factor * (1 - 1e-4))
    if mid.sum() >= 2:
        smooth = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(ratio[mid], smooth, 1)
        low = -intercept / slope
        high = low + 1 / slope
        scaling = {"rope_type": "llama3", "factor": _f32(factor), "low_freq_factor": round(float(low), 6),
                   "high_freq_factor": round(float(high), 6), "original_max_position_embeddings": orig_ctx}
        if np.allclose(_llama3_factors(scaling, ratio), f, rtol=1e-3):
            return scaling
    raise ModelLoadError(f"GGUF file {path} has a rope_freqs tensor that llmserve cannot express as "
                         f"llama3 rope scaling")


def _llama3_factors(scaling: dict[str, Any], ratio: np.ndarray) -> np.ndarray:
    """The divisors llama3 scaling applies at each orig_ctx/wavelength ratio."""
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    smooth = np.clip((ratio - low) / (high - low), 0.0, 1.0)
    return 1 / ((1 - smooth) / factor + smooth)


# ---------------------------------------------------------------------------------------------
# model.safetensors, written one tensor at a time so peak memory is one dequantized tensor


def _write_safetensors(out: Path, plans: list[_TensorPlan], path: Path) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for plan in plans:
        nbytes = math.prod(plan.shape) * 4
        header[plan.hf_name] = {"dtype": "F32", "shape": list(plan.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the format wants the data section 8-byte aligned
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for plan in plans:
            w = plan.load()
            if w.shape != plan.shape or w.dtype != np.float32:
                raise ModelLoadError(f"GGUF tensor for {plan.hf_name!r} of {path} dequantized to shape "
                                     f"{w.shape}, expected {plan.shape}")
            f.write(memoryview(w.astype("<f4", copy=False)))  # no copy on little-endian hosts


def _write_blocks(out: Path, path: Path, hp: _Hparams, tensors: dict[str, Any]) -> None:
    """The 2-D tensors stored in a block format, raw (rows in HF order), for the weight storage."""
    from safetensors.numpy import save_file

    from llmserve.model.gguf_quant import block_format

    out.parent.mkdir(parents=True, exist_ok=True)
    blocks: dict[str, np.ndarray] = {}
    formats: dict[str, str] = {}
    for name, tensor in tensors.items():
        fmt = block_format(_type_name(tensor.tensor_type))
        hf_name = _hf_name(name, hp.num_layers, hp.arch)
        if fmt is None or hf_name is None or len(tensor.shape) != 2:
            continue
        rows = np.asarray(tensor.data, dtype=np.uint8).reshape(int(tensor.shape[1]), -1)
        heads = _permuted_heads(name, hp)
        blocks[hf_name] = _unpermute(rows, heads) if heads is not None else np.ascontiguousarray(rows)
        formats[hf_name] = fmt
    save_file(blocks, str(out), metadata={"formats": json.dumps(formats)})


# ---------------------------------------------------------------------------------------------
# tokenizer


def _write_tokenizer(path: Path, out: Path, chat_template: str | None) -> None:
    from transformers import AutoTokenizer

    # Load from a directory holding only the GGUF, so tokenizer files that happen to sit beside the
    # user's file (a downloaded repo, say) cannot leak into the conversion.
    with tempfile.TemporaryDirectory(prefix=".llmserve-gguf-") as alone:
        link = Path(alone) / path.name
        try:
            os.symlink(path, link)
        except OSError:
            shutil.copyfile(path, link)
        try:
            tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file=path.name, local_files_only=True)
        except Exception as e:  # transformers raises many kinds for a missing or odd tokenizer
            raise ModelLoadError(f"cannot build a tokenizer from the metadata of GGUF file {path} "
                                 f"({type(e).__name__})") from e
    if chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out)
    _finish_tokenizer_config(out / "tokenizer_config.json", tokenizer.chat_template)


def _finish_tokenizer_config(config_path: Path, chat_template: str | None) -> None:
    """Put the chat template in tokenizer_config.json too (transformers 5 saves it only as
    chat_template.jinja, older readers look in the config), and drop how we happened to load it."""
    config = _read_json(config_path) or {}
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    if chat_template:
        config.setdefault("chat_template", chat_template)
    _write_json(config_path, config)

