"""One CPU kernel from two versions of csrc/, measured side by side in one process, step by step.

On a shared box the same code's timings spread by 15-30% from one process to the next
(docs/benchmarks.md, twenty-first session): more than most kernel changes are worth. This builds
the kernel from the working tree and from a git revision, each into a small extension that binds
only that function (so both load in one process), checks that their outputs agree, runs the same
workload through both alternately, and reports the median of the per-step time ratios.

    .venv/bin/python benchmarks/paired_kernels.py decode_attention --base HEAD~1 [--dtype float32]
    .venv/bin/python benchmarks/paired_kernels.py gguf_linear --base HEAD~1 [--rows 64]

Workloads: decode_attention is W1's decode step (64 sequences x 320 positions, SmolLM2-135M's
heads, 30 layers' caches: benchmarks/decode_attention.py); gguf_linear is SmolLM2-135M's four Q4_1
projections over 30 layers of distinct weights and inputs.
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "llmserve" / "csrc"
sys.path.insert(0, str(ROOT))

# The function each workload calls and the sources it needs.
SOURCES = {"paged_attention": ["paged_attention.cpp"], "gguf_linear": ["gguf_gemm.cpp", "gguf_kquant.cpp"]}
FUNCTION = {"decode_attention": "paged_attention", "gguf_linear": "gguf_linear"}

BINDING = """#include <torch/extension.h>
#include "kernels.h"
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {{
  m.def("{fn}", &{fn}, py::call_guard<py::gil_scoped_release>());
}}
"""


def build(src: Path, fn: str, cache: Path) -> object:
    """The extension binding `fn` built from the csrc/ at src, named and cached by its sources."""
    from torch.utils.cpp_extension import load

    from llmserve import kernels

    files = [src / f for f in SOURCES[fn]]
    digest = hashlib.sha256()
    for f in sorted(src.glob("*.h")) + files:
        digest.update(f.read_bytes())
    name = f"paired_{fn}_{digest.hexdigest()[:12]}"
    out = cache / name
    out.mkdir(parents=True, exist_ok=True)
    binding = out / "binding.cpp"
    binding.write_text(BINDING.format(fn=fn))
    return load(name=name, sources=[str(f) for f in files] + [str(binding)],
                extra_cflags=kernels.compile_flags() + [f"-I{src}"], extra_ldflags=kernels.LINK_FLAGS,
                build_directory=str(out), verbose=False)


def decode_attention_workload(args) -> tuple[Callable[[object], list[torch.Tensor]], str]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from decode_attention import decode_step

    step = decode_step(getattr(torch, args.dtype), 64, 320, 30, hot=False)
    return step, f"decode attention, 64 x 320 positions, 30 layers, {args.dtype} cache"


def gguf_linear_workload(args) -> tuple[Callable[[object], list[torch.Tensor]], str]:
    from llmserve.model.gguf_quant import quantize

    gen = torch.Generator().manual_seed(0)
    shapes = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # (K, N): qkv, o, gate_up, down
    layers = [(quantize(torch.randn(n, k, generator=gen) * 0.05, "q4_1"), torch.randn(args.rows, k, generator=gen))
              for _ in range(30) for k, n in shapes]
    none = torch.empty(0)

    def step(mod) -> list[torch.Tensor]:
        return [mod.gguf_linear(x, w, 0, none) for w, x in layers]

    return step, f"Q4_1 projections of SmolLM2-135M, 30 layers, {args.rows} rows"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", choices=sorted(FUNCTION))
    ap.add_argument("--base", default="HEAD", help="git revision whose csrc/ is the baseline (default HEAD)")
    ap.add_argument("--dtype", default="float32", help="decode_attention's cache dtype")
    ap.add_argument("--rows", type=int, default=64, help="gguf_linear's rows of x")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be at least 2")
    torch.set_num_threads(args.threads)
    fn = FUNCTION[args.workload]
    from llmserve.kernels import jit_cache_root

    cache = jit_cache_root() / "paired"
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", args.base, "llmserve/csrc"], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        print(f"building {fn} from {args.base} and from the working tree (once per source version)", flush=True)
        base = build(Path(tmp) / "llmserve" / "csrc", fn, cache)
    new = build(CSRC, fn, cache)
    workloads = {"decode_attention": decode_attention_workload, "gguf_linear": gguf_linear_workload}
    step, what = workloads[args.workload](args)
    diff = max((a - b).abs().max().item() for a, b in zip(step(base), step(new)))
    agree = "bit for bit the same" if diff == 0 else f"max |diff| {diff:.3g}"
    print(f"{what}, {args.threads} threads\noutputs: {agree}")
    times: dict[str, list[float]] = {"base": [], "new": []}
    for _ in range(args.steps):  # alternate, so a slow spell of the box hits both sides
        for side, mod in (("base", base), ("new", new)):
            t = time.perf_counter()
            step(mod)
            times[side].append(time.perf_counter() - t)
    ratios = [n / b for n, b in zip(times["new"], times["base"])]
    for side in ("base", "new"):
        print(f"  {side:4}: median {statistics.median(times[side]) * 1e3:7.1f} ms a step, best "
              f"{min(times[side]) * 1e3:7.1f}")
    print(f"median time ratio new / base over {args.steps} paired steps: {statistics.median(ratios):.3f} "
          f"(quartiles {statistics.quantiles(ratios, n=4)[0]:.3f} - {statistics.quantiles(ratios, n=4)[2]:.3f})")


if __name__ == "__main__":
    main()
