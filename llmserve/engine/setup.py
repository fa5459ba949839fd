"""From EngineConfig to loaded parts: model folder, tokenizer, model, KV cache size, runner."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from llmserve.attention.backend import TorchAttention
from llmserve.attention.cpu_paged import CpuPagedAttention
from llmserve.attention.kv_dtype import FLOAT_DTYPES, FP8_DTYPES
from llmserve.config import EngineConfig
from llmserve.errors import InvalidRequestError
from llmserve.kernels import cpu_kernels
from llmserve.model.arch_config import ArchConfig
from llmserve.model.loader import load_model
from llmserve.model.gguf_quant import GGUF_FORMATS, q8_path_name
from llmserve.model.linear import WeightStorage, onednn_available
from llmserve.model.ops import CpuFusedOps, TorchOps
from llmserve.model.specs import KVLayout, kv_layout
from llmserve.runner import STATE_DTYPE, ModelRunner
from llmserve.threads import ThreadGovernor
from llmserve.tokenizer import eos_token_ids, load_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = 1 << 30  # 1 GiB of KV cache on CPU unless told otherwise
CUDA_KV_FRACTION = 0.85  # of the memory free after loading the weights
Q8_LAYERS = "GGUF block layers (Q4_1, Q8_0, Q5_0, Q4_K, Q5_K, Q6_K)"  # what --activations q8 computes


@dataclass
class EngineParts:
    tokenizer: object
    arch: ArchConfig
    runner: ModelRunner
    max_model_len: int
    num_blocks: int
    eos_token_ids: tuple[int, ...]
    device: torch.device
    model_name: str
    model_folder: Path
    thread_governor: ThreadGovernor | None = None
    proposer: object = None  # spec.proposer.Proposer when speculative decoding is on
    num_state_slots: int = 0  # requests whose state-space layers' state fits at once


# A replica on a host where the model is already loaded gets it from there (cluster/shared_weights.py:
# one copy per host in shared memory) instead of loading and converting it again.
MODEL_SOURCE: Callable[[], torch.nn.Module] | None = None


def default_token_budget(device: torch.device) -> int:
    """max_num_batched_tokens when the config leaves it unset (see EngineConfig)."""
    return 512 if device.type == "cpu" else 2048


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return FLOAT_DTYPES[name]


def _model_len(config: EngineConfig, arch: ArchConfig) -> int:
    limit = arch.max_position_embeddings
    if arch.rope_scaling is not None and "factor" in arch.rope_scaling and arch.rope_scaling.get(
            "rope_type", arch.rope_scaling.get("type")) in ("linear", "dynamic"):
        limit = int(limit * arch.rope_scaling["factor"])
    if config.max_model_len is not None:
        if config.max_model_len > limit:
            raise InvalidRequestError(f"max_model_len {config.max_model_len} exceeds the model's context of {limit} tokens")
        limit = config.max_model_len
    return limit


def _kv_budget(config: EngineConfig, device: torch.device) -> int:
    """Bytes for the KV cache and the state slots."""
    if config.kv_cache_memory is not None:
        return config.kv_cache_memory
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_KV_FRACTION)
    return DEFAULT_CPU_KV_BYTES


def _num_state_slots(config: EngineConfig, per_slot: int, has_attention: bool, device: torch.device) -> int:
    """One slot per running request, up to max_num_seqs, from the budget (half of it when
    attention layers need blocks too)."""
    if not per_slot:
        return 0
    budget = _kv_budget(config, device) // (2 if has_attention else 1)
    slots = min(config.max_num_seqs, budget // per_slot)
    if slots < 1:
        raise InvalidRequestError(f"the KV cache budget of {budget} bytes holds no request's state of {per_slot} bytes")
    return slots


def _num_blocks(config: EngineConfig, layout: KVLayout, per_block: int, max_model_len: int,
                device: torch.device, state_bytes: int = 0) -> int:
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    if not per_block:  # no attention layers: no blocks (the pool keeps one, never taken)
        return 1
    budget = _kv_budget(config, device) - state_bytes
    blocks = budget // per_block
    if config.kv_cache_memory is None:  # no more than every sequence at full length could use
        per_request = layout.blocks_per_request(max_model_len, config.block_size, _token_budget(config, device))
        blocks = min(blocks, config.max_num_seqs * per_request)
    if blocks < 1:
        raise InvalidRequestError(f"the KV cache budget of {budget} bytes holds no block of {per_block} bytes")
    return int(blocks)


def _token_budget(config: EngineConfig, device: torch.device) -> int:
    return config.max_num_batched_tokens or default_token_budget(device)


def build_engine_parts(config: EngineConfig) -> EngineParts:
    from llmserve.model.resolve import resolve_model_folder

    folder = resolve_model_folder(config.model)
    arch = ArchConfig.from_folder(folder)
    tokenizer = load_tokenizer(config.tokenizer or folder)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    governor = None
    if device.type == "cpu":
        governor = ThreadGovernor()
        governor.calibrate()
    if config.seed is not None:
        torch.manual_seed(config.seed)
    max_model_len = _model_len(config, arch)
    kernels = cpu_kernels_for(device)
    onednn = kernels is not None and onednn_available()
    _check_activations(config.activations, kernels, dtype, device)
    storage = WeightStorage(_storage_format(config.quantization, kernels, dtype, device), kernels, onednn,
                            activations=config.activations)
    if config.activations == "q8" and storage.fmt not in ("auto",) + tuple(GGUF_FORMATS):
        raise InvalidRequestError(
            f"--activations q8 applies to {Q8_LAYERS}, and --quantization {config.quantization or 'none'} "
            "stores none: use auto (a GGUF model's own blocks), q4_1 or q8_0")
    ops = CpuFusedOps(kernels) if kernels is not None else TorchOps()
    if MODEL_SOURCE is not None:
        model = MODEL_SOURCE()
        storage, ops = model.lm_head.storage, model.ops
    else:
        model = load_model(folder, max_model_len, dtype, device, ops, storage)
    if storage.fmt != "none":
        logger.info("linear layers stored as: %s", ", ".join(f"{n} {fmt}" for fmt, n in sorted(storage.counts.items())))
    gguf_layers = storage.block_layers
    if config.activations == "q8":
        if not gguf_layers:
            raise InvalidRequestError(f"--activations q8 applies to {Q8_LAYERS}, and this model has float weights "
                                      "(quantization auto kept none): use --quantization q4_1 or q8_0")
        logger.info("activations: q8 (8-bit per block of 32, integer dot products, %s kernels) in %d GGUF layers",
                    q8_path_name(kernels), gguf_layers)
    else:
        logger.info("activations: float32")
    kv_dtype = _kv_cache_dtype(config.kv_cache_dtype, dtype)
    layout = kv_layout(model.kv_cache_specs(), by_kind=config.kv_groups)
    per_block = layout.bytes_per_block(config.block_size, kv_dtype)
    state_specs = model.state_specs() if hasattr(model, "state_specs") else []
    per_slot = sum(spec.bytes_per_slot(STATE_DTYPE) for spec in state_specs)
    num_slots = _num_state_slots(config, per_slot, per_block > 0, device)
    if state_specs:
        _check_state_model(config)
    num_blocks = _num_blocks(config, layout, per_block, max_model_len, device, num_slots * per_slot)
    budget = _token_budget(config, device)
    longest = layout.max_tokens(num_blocks, config.block_size, budget) if per_block else None
    if longest == 0:
        raise InvalidRequestError(
            f"a KV cache of {num_blocks} blocks holds no request: the window layers need "
            f"{layout.blocks_per_request(1 << 40, config.block_size, budget)} blocks for one request's window "
            f"and a step of {budget} tokens (raise the KV cache or lower max_num_batched_tokens)")
    if longest is not None and longest < max_model_len:
        logger.info("context capped at %d tokens: the KV cache holds no more", longest)
        max_model_len = longest
    backend = partial(CpuPagedAttention, kernels) if kernels is not None else TorchAttention
    runner = ModelRunner(model, num_blocks, config.block_size, kv_dtype, device, backend, seed=config.seed,
                         kernels=kernels, kv_groups=config.kv_groups, num_state_slots=num_slots)
    logger.info("KV cache: %d blocks of %d tokens (%d tokens, %.1f MiB), dtype %s, device %s",
                num_blocks, config.block_size, num_blocks * config.block_size, num_blocks * per_block / 2**20,
                str(kv_dtype).removeprefix("torch."), device)
    if num_slots:
        logger.info("state: %d slots of %.2f MiB (%d state-space layers; a request holds one however long)",
                    num_slots, per_slot / 2**20, len(state_specs))
    if layout.num_groups > 1 or layout.windowed:
        logger.info("KV groups: %s", ", ".join(
            f"{len(layers)} layers {'full' if w is None else f'window {w}'}"
            for w, layers in zip(layout.windows, layout.group_layers)))
    name = Path(config.model).name if config.model else _default_name()
    proposer = None
    if config.speculative_config is not None:
        from llmserve.spec.build import TargetParts, build_proposer

        proposer = build_proposer(config.speculative_config, TargetParts(
            folder, model, runner, dtype, device, kernels, onednn, ops, max_model_len, num_blocks,
            config.block_size, kv_dtype, backend, arch.vocab_size))
        logger.info("speculative decoding: %s, up to %d draft tokens", config.speculative_config.method,
                    config.speculative_config.num_speculative_tokens)
    return EngineParts(tokenizer, arch, runner, max_model_len, num_blocks,
                       eos_token_ids(folder, tokenizer, arch.eos_token_ids), device, name, folder, governor, proposer,
                       num_slots)


def _check_state_model(config: EngineConfig) -> None:
    """What state-space layers cannot do (yet): roll their state back over rejected drafts."""
    if config.speculative_config is not None:
        raise InvalidRequestError("speculative decoding needs the state of rejected drafts rolled back, which this "
                                  "model's state-space layers cannot do")


def _kv_cache_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The KV cache's dtype: the model's, or a narrower one under float32 compute (8-bit floats
    only there)."""
    if name == "auto":
        return dtype
    kv_dtype = FP8_DTYPES.get(name) or FLOAT_DTYPES[name]
    if kv_dtype != dtype and dtype != torch.float32:
        raise InvalidRequestError(f"kv_cache_dtype {name} needs float32 compute or the same dtype as the model "
                                  f"(dtype is {str(dtype).removeprefix('torch.')})")
    return kv_dtype


def _storage_format(quantization: str | None, kernels, dtype: torch.dtype, device: torch.device) -> str:
    """The weight storage the projections are built with."""
    if quantization in (None, "none"):
        return "none"
    if quantization == "auto":
        # Only where the block kernels run: elsewhere float weights are as fast and exact too.
        return "auto" if kernels is not None and dtype == torch.float32 else "none"
    if dtype != torch.float32 or device.type != "cpu":
        raise InvalidRequestError("weight-only quantization runs on CPU with float32 activations (--dtype float32)")
    return quantization


def _check_activations(activations: str, kernels, dtype: torch.dtype, device: torch.device) -> None:
    """8-bit activations run only in the GGUF block kernels: anywhere else they would be a silent no-op."""
    if activations == "float32":
        return
    if device.type != "cpu":
        raise InvalidRequestError(f"--activations {activations} runs on CPU (the GGUF block kernels), not {device.type}")
    if dtype != torch.float32:
        raise InvalidRequestError(f"--activations {activations} quantizes float32 activations: use --dtype float32 (or auto)")
    if kernels is None:
        raise InvalidRequestError(f"--activations {activations} needs llmserve's CPU kernels, which are unavailable "
                                  "here (LLMSERVE_CPU_KERNELS=0, or no compiler to build them)")


def cpu_kernels_for(device: torch.device):
    """llmserve's compiled CPU kernels where they apply; LLMSERVE_CPU_KERNELS=0 keeps plain torch."""
    if device.type != "cpu" or os.environ.get("LLMSERVE_CPU_KERNELS", "1") == "0":
        return None
    return cpu_kernels()


def _default_name() -> str:
    from llmserve.model.default_model import DEFAULT_MODEL_NAME

    return DEFAULT_MODEL_NAME
