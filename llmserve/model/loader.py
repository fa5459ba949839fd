"""Build a model from an HF folder: config.json plus one or sharded *.safetensors files."""
from __future__ import annotations

import ctypes
import json
import logging
import time
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from safetensors import SafetensorError

from llmserve.errors import ModelLoadError
from llmserve.model.arch_config import ArchConfig
from llmserve.model.linear import WeightStorage
from llmserve.model.ops import TorchOps
from llmserve.model.registry import model_class

logger = logging.getLogger(__name__)

# HF name suffix -> (our parameter suffix, shard index within a fused parameter or None)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
    "feed_forward.gate_proj": ("feed_forward.gate_up_proj", 0),  # (Bamba's name for the MLP)
    "feed_forward.up_proj": ("feed_forward.gate_up_proj", 1),
}


def _target(name: str) -> tuple[str, int | None] | None:
    """Map an HF tensor name to (our parameter name, fused shard) or None to skip it."""
    for prefix in ("model.", "backbone."):  # (Mamba-2 checkpoints name their trunk "backbone")
        if name.startswith(prefix):
            name = name[len(prefix):]
    if "rotary_emb" in name:
        return None
    if name == "final_layernorm.weight":  # (Bamba's name for the final norm)
        name = "norm.weight"
    for hf, (ours, shard) in _FUSED.items():
        if f".{hf}." in f".{name}":
            return name.replace(hf, ours), shard
    return name, None


def _shard_slice(model: nn.Module, param_name: str, shard: int) -> slice:
    cfg = model.cfg
    if "qkv_proj" in param_name:
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        starts, sizes = [0, q, q + kv], [q, kv, kv]
    else:
        starts, sizes = [0, cfg.intermediate_size], [cfg.intermediate_size] * 2
    return slice(starts[shard], starts[shard] + sizes[shard])


def _safetensors_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors files in model folder {folder}")
    return files


def load_model(folder: Path, max_model_len: int, dtype: torch.dtype, device: torch.device,
               ops: TorchOps | None = None, storage: WeightStorage | None = None) -> nn.Module:
    """The model of the folder's architecture (model/registry.py), built with the given ops and
    weight storage, its weights loaded and then handed to the storage."""
    start = time.perf_counter()
    cfg = ArchConfig.from_folder(folder)
    with torch.device("meta"):
        model = model_class(cfg.architecture)(cfg, max_model_len, ops, storage)
    model.to_empty(device=device)
    model.to(dtype)
    params = dict(model.named_parameters())
    loaded: dict[str, int] = {}  # parameter -> number of shards written
    for file in _safetensors_files(folder):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    target = _target(name)
                    if target is None:
                        continue
                    pname, shard = target
                    if pname == "lm_head.weight" and cfg.tie_word_embeddings:
                        continue  # tied checkpoints sometimes store the copy anyway
                    if pname not in params:
                        raise ModelLoadError(f"unexpected tensor {name!r} in {file}")
                    _copy_into(model, params[pname], pname, shard, f.get_tensor(name), name, file)
                    loaded[pname] = loaded.get(pname, 0) + 1
        except SafetensorError as e:
            raise ModelLoadError(f"cannot read safetensors file {file}: {e}") from None
    missing = [p for p in params if loaded.get(p, 0) < _expected_shards(p)]
    if missing:
        raise ModelLoadError(f"model folder {folder} lacks tensors for {missing[:5]}")
    model.eval().requires_grad_(False)
    _attach_source_blocks(model, folder, cfg)
    model.process_weights()
    model.init_rope()
    _return_freed_memory()
    logger.info("loaded %s (%d layers) in %.2fs", cfg.architecture, cfg.num_layers, time.perf_counter() - start)
    return model


def _return_freed_memory() -> None:
    """Loading frees the float copies of every weight stored as blocks; glibc keeps freed heap
    pages (tensors under its mmap threshold) unless asked to hand them back."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _attach_source_blocks(model: nn.Module, folder: Path, cfg: ArchConfig) -> None:
    """A converted GGUF folder keeps the file's quantized tensors: hand each projection the blocks
    of its shards (in shard order), for a storage that computes with them as published."""
    from llmserve.model.gguf_loader import BLOCKS_FILE
    from llmserve.model.linear import Projection

    path = folder / BLOCKS_FILE
    if not path.is_file():
        return
    shards: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}
    with safe_open(str(path), framework="pt") as f:
        formats = json.loads((f.metadata() or {}).get("formats", "{}"))
        for name in f.keys():
            target = _target(name)
            if target is None or name not in formats:
                continue
            pname, shard = target
            shards.setdefault(pname, {})[shard or 0] = (formats[name], f.get_tensor(name))
    modules = dict(model.named_modules())
    for pname, parts in shards.items():
        owner = modules.get(pname.removesuffix(".weight"))
        if pname == "embed_tokens.weight":
            model.embed_tokens.source_blocks = parts[0]
            if cfg.tie_word_embeddings:
                owner = model.lm_head
        if isinstance(owner, Projection) and len(parts) == _expected_shards(pname):
            owner.source_blocks = [parts[i] for i in range(len(parts))]


def _expected_shards(pname: str) -> int:
    if "qkv_proj" in pname:
        return 3
    if "gate_up_proj" in pname:
        return 2
    return 1


def _copy_into(model, param: torch.Tensor, pname: str, shard: int | None, tensor: torch.Tensor,
               name: str, file: Path) -> None:
    dest = param.data if shard is None else param.data[_shard_slice(model, pname, shard)]
    if dest.shape != tensor.shape:
        raise ModelLoadError(f"tensor {name!r} in {file} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
    with torch.no_grad():
        dest.copy_(tensor)
