"""Decode attention as W1's decode steps see it: 64 sequences x 320 context tokens, SmolLM2-135M's
heads (9 query, 3 KV, D=64), blocks of 16 scattered over the pool, one kernel call per layer for 30
layers, each layer with its own cache, so a step reads more KV than the L3 holds (as in a real step).
Beside it, the same 30 calls on one layer's cache, reused: what the kernel costs when memory is not the
limit, as far as that cache fits the L3 (at batch 64 it is ~30 MB, a whole Zen 3 L3: use --batch 8 for
a cache that surely stays). Prints ms per step and the KV bytes read per second.

    .venv/bin/python benchmarks/decode_attention.py [--dtypes float16,float32] [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from llmserve.kernels import cpu_kernels

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampler import best_ms  # noqa: E402 - the same best-of timing as the sampler benchmark

H, KVH, D, BS = 9, 3, 64, 16


def decode_step(dtype: torch.dtype, batch: int, context: int, layers: int, hot: bool):
    """One decode step's attention calls, as a function of the kernels module (returns each layer's output)."""
    blocks_per = -(-(context + 1) // BS)
    num_blocks = batch * blocks_per
    gen = torch.Generator().manual_seed(0)
    distinct = 1 if hot else layers
    caches = [(torch.randn(num_blocks * BS, KVH, D, generator=gen).to(dtype),
               torch.randn(num_blocks * BS, KVH, D, generator=gen).to(dtype)) for _ in range(distinct)]
    caches = caches * (layers // distinct)
    tables = torch.randperm(num_blocks, generator=gen).to(torch.int32).view(batch, blocks_per)
    seq_lens = torch.full((batch,), context, dtype=torch.int32)
    qsl = torch.arange(batch + 1, dtype=torch.int32)
    slots = tables[:, (context - 1) // BS].long() * BS + (context - 1) % BS
    q, k, v = torch.randn(batch, H, D), torch.randn(batch, KVH, D), torch.randn(batch, KVH, D)

    def step(kernels) -> list[torch.Tensor]:
        return [kernels.paged_attention(q, k, v, kc, vc, slots, qsl, seq_lens, tables, BS, D ** -0.5, 0, 0.0, None)
                for kc, vc in caches]

    return step


def measure(kernels, dtype: torch.dtype, batch: int, context: int, layers: int, hot: bool, repeats: int) -> float:
    step = decode_step(dtype, batch, context, layers, hot)
    return best_ms(lambda: step(kernels), repeats) / 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="float16,float32")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=320)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernels = cpu_kernels()
    if kernels is None:
        raise SystemExit("llmserve's CPU kernels are unavailable here")
    print(f"{args.batch} decodes x {args.context} context, {args.layers} layers, {args.threads} threads; best of "
          f"{args.repeats}")
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        read = args.batch * args.context * KVH * D * 2 * args.layers * torch.empty((), dtype=dtype).element_size()
        cold = measure(kernels, dtype, args.batch, args.context, args.layers, False, args.repeats)
        hot = measure(kernels, dtype, args.batch, args.context, args.layers, True, args.repeats)
        print(f"  {name:8} KV {read / 2**20:6.0f} MiB a step: {cold * 1e3:6.1f} ms ({read / cold / 1e9:5.1f} GB/s); "
              f"one layer's cache ({read / args.layers / 2**20:.1f} MiB) reused: {hot * 1e3:6.1f} ms "
              f"({read / hot / 1e9:5.1f} GB/s)")


if __name__ == "__main__":
    main()
