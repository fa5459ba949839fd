"""KV cache dtypes: the names users give, and what an 8-bit float cache needs of the code that
writes and moves it. torch's float8 types have no index_copy_, index_fill_ or masked_fill_ on CPU,
so block copies and zero fills go through a byte view of the same storage (a zero byte is +0.0 in
both formats)."""
from __future__ import annotations

import torch

# The 8-bit formats, as vLLM names them ("fp8" is e4m3, its default); stored without a scale.
FP8_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def bits(t: torch.Tensor) -> torch.Tensor:
    """t itself, or for an 8-bit float tensor a uint8 view of its storage (for copies and fills)."""
    return t.view(torch.uint8) if is_fp8(t.dtype) else t


def to_cache(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded to the cache's dtype, as the CPU kernel stores it: to nearest, and an 8-bit format
    saturates at its largest finite value (e5m2's conversion would give infinity)."""
    if is_fp8(dtype):
        top = torch.finfo(dtype).max
        x = x.float().clamp(-top, top)
    return x.to(dtype)
