"""Exact Q4_1/Q8_0 projections over gguf_q8_pack's tiles (gguf_linear_tiles) against the same
weights in GGUF's row-major blocks (gguf_linear), in one process, alternately, row count by row count.

    LLMSERVE_NUM_THREADS=2 .venv/bin/python benchmarks/exact_tiles.py [--rows 1,2,4,5,8,9,64,512]

Weights: SmolLM2-135M's four projection shapes (fused QKV 960 x 576, o 576 x 576, fused gate/up
3072 x 576, down 576 x 1536), random, quantized to each format. Before timing, the outputs are
checked: equal bit for bit from 9 rows on (both widen the same weights into the same GEMM), within
float32 rounding of a float64 reference below that. Reports the median of per-round time ratios.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmserve.kernels import cpu_kernels  # noqa: E402
from llmserve.model.gguf_quant import quantize  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
FORMATS = {"q4_1": 0, "q8_0": 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,4,5,8,9,64,512")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    kernels = cpu_kernels()
    if kernels is None or not hasattr(kernels, "gguf_linear_tiles"):
        sys.exit("llmserve's CPU kernels (with gguf_linear_tiles) are needed: make install")
    torch.manual_seed(0)
    none = torch.empty(0)
    print(f"{'format':8}{'rows':>6}{'blocks ms':>12}{'tiles ms':>11}{'tiles / blocks':>16}")
    for fmt, code in FORMATS.items():
        layers = []
        for n, k in SHAPES:
            blocks = quantize(torch.randn(n, k) * 0.05, fmt)
            layers.append((blocks, kernels.gguf_q8_pack(blocks, code), n, k))
        for rows in (int(r) for r in args.rows.split(",")):
            xs = [torch.randn(rows, k) for _, _, _, k in layers]
            for (blocks, tiles, n, k), x in zip(layers, xs):
                a = kernels.gguf_linear(x, blocks, code, none)
                b = kernels.gguf_linear_tiles(x, tiles, code, n, none)
                ref = x.double() @ kernels.gguf_dequantize(blocks, code, k).double().T
                assert torch.allclose(b.double(), ref, atol=1e-4, rtol=1e-4), (fmt, rows, n, k)
                assert rows <= 8 or torch.equal(a, b), (fmt, rows, n, k)
            calls = max(1, 256 // rows)

            def run(tiled: bool) -> float:
                t0 = time.perf_counter()
                for _ in range(calls):
                    for (blocks, tiles, n, _), x in zip(layers, xs):
                        if tiled:
                            kernels.gguf_linear_tiles(x, tiles, code, n, none)
                        else:
                            kernels.gguf_linear(x, blocks, code, none)
                return (time.perf_counter() - t0) / calls * 1e3

            run(False), run(True)  # warm-up
            times = [(run(False), run(True)) for _ in range(args.rounds)]
            ratio = statistics.median(t / b for b, t in times)
            print(f"{fmt:8}{rows:>6}{statistics.median(b for b, _ in times):>12.3f}"
                  f"{statistics.median(t for _, t in times):>11.3f}{ratio:>16.3f}", flush=True)


if __name__ == "__main__":
    main()
