"""The batched sampler, plain torch against llmserve's CPU kernel (sample_rows), same run.

    .venv/bin/python benchmarks/sampler.py [--rows 64 --vocab 49152 --threads 2]

Times one sampler call over [rows, vocab] float32 logits (the embedded model's vocabulary by
default) for a few request mixes, best of --repeats, and prints torch / kernel ratios.
"""
from __future__ import annotations

import argparse
import time

import torch

from llmserve.kernels import cpu_kernels
from llmserve.sampling import Sampler, SamplingMetadata, SamplingRow
from llmserve.sampling_params import SamplingParams

MIXES = {
    "temperature 1": SamplingParams(temperature=1.0),
    "temperature 0.7": SamplingParams(temperature=0.7),
    "top_p 0.9": SamplingParams(temperature=0.8, top_p=0.9),
    "top_k 40": SamplingParams(temperature=0.8, top_k=40),
    "min_p 0.05": SamplingParams(temperature=1.0, min_p=0.05),
    "greedy": SamplingParams(temperature=0.0),
}


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernels = cpu_kernels()
    if kernels is None:
        raise SystemExit("llmserve's CPU kernels are unavailable here")
    logits = torch.randn(args.rows, args.vocab) * 3
    print(f"{args.rows} rows x {args.vocab}, {torch.get_num_threads()} threads; ms per call, best of {args.repeats}")
    print(f"{'mix':<18}{'torch':>9}{'kernel':>9}{'ratio':>8}")
    for name, params in MIXES.items():
        rows = [SamplingRow(params=params, prompt_token_ids=[0], output_token_ids=[], generator=None,
                            banned_token_ids=[]) for _ in range(args.rows)]
        meta = SamplingMetadata.from_rows(rows, args.vocab, torch.device("cpu"))
        plain, fast = Sampler(seed=0), Sampler(seed=0, kernels=kernels)
        t_plain = best_ms(lambda: plain(logits, meta), args.repeats)
        t_fast = best_ms(lambda: fast(logits, meta), args.repeats)
        print(f"{name:<18}{t_plain:>9.2f}{t_fast:>9.2f}{t_plain / t_fast:>7.2f}x")


if __name__ == "__main__":
    main()
