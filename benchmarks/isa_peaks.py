"""What this CPU's vector units can do, measured, beside what the kernels built on them get.

    .venv/bin/python benchmarks/isa_peaks.py [--threads N] [--seconds 0.5] [--no-kernels]

Peaks, from a small C loop of independent instructions compiled here (the C compiler `cc`, or $CC)
and run on every thread at once:
  - fp32 FMA: vfmadd231ps on 8 floats (16 flops an instruction), the ceiling of a float32 GEMM
    such as oneDNN's or vLLM's CPU path;
  - fp32 FMA zmm and bf16 vdpbf16ps zmm where the CPU has AVX-512 (and avx512_bf16): 16 FMAs, or
    32 bfloat16 products summed in pairs into float32, an instruction (vLLM's bfloat16 path);
  - int8 vpmaddubsw: 32 byte products an instruction (summed in pairs to 16 bits), AVX2's only
    8-bit multiply;
  - int8 vpmaddubsw + vpaddw: the same with the 16-bit add that must follow each one to keep a sum
    (AVX2 has no multiply-accumulate for bytes): the ceiling of the q8 kernels' inner loop;
  - int8 vpdpbusd (AVX-512 VNNI, where the CPU has it): 64 products a zmm instruction, summed into
    32 bits in the same instruction;
  - the AVX2 q8 kernel's own instruction mix for a row and a block of a 16-column tile (16 of those
    products-and-adds, then the widening, conversion and float scaling of the sums), free of loads
    and dependencies: what that kernel could reach if nothing but its arithmetic cost anything.
Products count as 2 ops, as the kernels' GOP/s do. Then, unless --no-kernels, the kernels on the
same threads: oneDNN's float32 GEMM (2048^3) and the q8 kernels (csrc/gguf_q8act.cpp) on Q4_1 and
Q8_0 weights (576 -> 1536, 512 rows), each as a share of its peak.

The ratio "int8 (with its adds) / fp32 FMA" bounds what 8-bit activations can gain over a float32
engine whose GEMMs run near the FMA peak: on a CPU whose byte multiply issues on one port where
FMAs issue on two, 32 products an instruction are only twice 8 FMAs on two ports, before the adds.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

from llmserve.kernels import cpu_features

# Each chain loop runs 12 independent chains (more than latency x ports of any of these
# instructions), so it measures throughput; asm volatile keeps the compiler from folding or dropping
# the work. A loop: its target, the operands it sets up, how chain i starts, one step of chain i.
CHAIN_LOOP = r"""
__attribute__((target("{target}"))) long {name}(long iters) {{
  {setup}
#define DECL(i) {decl}
  R12(DECL)
#undef DECL
  for (long n = 0; n < iters; ++n) {{
#define OP(i) {op}
    R12(OP)
#undef OP
  }}
  return iters * 12;
}}
"""
CHAINS = [
    dict(name="fp32_fma", target="avx2,fma", setup="__m256 b = _mm256_set1_ps(1.0f), c = _mm256_set1_ps(0.0f);",
         decl="__m256 a##i = _mm256_set1_ps((float)i);",
         op='asm volatile("vfmadd231ps %1, %2, %0" : "+x"(a##i) : "x"(b), "x"(c));'),
    dict(name="fp32_fma_zmm", target="avx512f",
         setup="__m512 b = _mm512_set1_ps(1.0f), c = _mm512_set1_ps(0.0f);",
         decl="__m512 a##i = _mm512_set1_ps((float)i);",
         op='asm volatile("vfmadd231ps %1, %2, %0" : "+v"(a##i) : "v"(b), "v"(c));'),
    dict(name="bf16_dot_zmm", target="avx512f,avx512bf16",
         setup="__m512 b = _mm512_set1_ps(1.0f), c = _mm512_set1_ps(0.0f);",
         decl="__m512 a##i = _mm512_set1_ps((float)i);",
         op='asm volatile("vdpbf16ps %1, %2, %0" : "+v"(a##i) : "v"(b), "v"(c));'),
    dict(name="int8_maddubs", target="avx2", setup="__m256i w = _mm256_set1_epi8(3), x = _mm256_set1_epi8(5);",
         decl="__m256i a##i;", op='asm volatile("vpmaddubsw %1, %2, %0" : "=x"(a##i) : "x"(w), "x"(x));'),
    dict(name="int8_maddubs_add", target="avx2",
         setup="__m256i w = _mm256_set1_epi8(3), x = _mm256_set1_epi8(5), t;",
         decl="__m256i a##i = _mm256_setzero_si256();",
         op=r'asm volatile("vpmaddubsw %2, %3, %1\n\tvpaddw %1, %0, %0" : "+x"(a##i), "=&x"(t) : "x"(w), "x"(x));'),
    dict(name="int8_vnni", target="avx512f,avx512vnni",
         setup="__m512i w = _mm512_set1_epi8(3), x = _mm512_set1_epi8(5);",
         decl="__m512i a##i = _mm512_setzero_si512();",
         op='asm volatile("vpdpbusd %1, %2, %0" : "+v"(a##i) : "v"(w), "v"(x));'),
]
SOURCE = r"""
#include <immintrin.h>
#define R12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
""" + "".join(CHAIN_LOOP.format(**c) for c in CHAINS) + r"""
// The AVX2 q8 kernel's instruction mix for one row of a panel and one block of a 16-column tile
// (csrc/gguf_q8act.cpp, tile_kernel_avx2_nibbles): 16 products-and-adds, then widening (vpmaddwd),
// conversion and the float scaling of both 8-column halves. Counted as its 16 x 32 products.
__attribute__((target("avx2,fma"))) long q8_kernel_mix(long iters) {
  __m256i w = _mm256_set1_epi8(3), x = _mm256_set1_epi8(5), s0 = w, s1 = w, s2 = w, s3 = w, t0, t1, t2, t3, i0, i1;
  __m256 b = _mm256_set1_ps(1.0f), c = _mm256_set1_ps(0.0f), f0 = b, f1 = b, f2 = b, f3 = b, g0, g1, h0, h1;
  for (long n = 0; n < iters; ++n) {
#define MA(s, t) asm volatile("vpmaddubsw %2, %3, %1\n\tvpaddw %1, %0, %0" : "+x"(s), "=&x"(t) : "x"(w), "x"(x));
#define ROW4 MA(s0, t0) MA(s1, t1) MA(s2, t2) MA(s3, t3)
    ROW4 ROW4 ROW4 ROW4
#undef ROW4
#undef MA
    asm volatile("vpmaddwd %2, %3, %0\n\tvpmaddwd %2, %4, %1" : "=&x"(i0), "=&x"(i1) : "x"(x), "x"(s0), "x"(s1));
    asm volatile("vcvtdq2ps %2, %0\n\tvcvtdq2ps %3, %1" : "=&x"(g0), "=&x"(g1) : "x"(s2), "x"(s3));
    asm volatile("vmulps %2, %3, %0\n\tvmulps %2, %3, %1" : "=&x"(h0), "=&x"(h1) : "x"(b), "x"(c));
    asm volatile("vfmadd231ps %4, %5, %0\n\tvfmadd231ps %4, %5, %1\n\tvfmadd231ps %4, %5, %2\n\tvfmadd231ps %4, %5, %3"
                 : "+x"(f0), "+x"(f1), "+x"(f2), "+x"(f3) : "x"(b), "x"(c));
  }
  return iters;
}
"""

# name -> (C function, ops per unit it returns (a product or an FMA is 2 ops), CPU flags it needs)
LOOPS = {
    "fp32 FMA (vfmadd231ps ymm)": ("fp32_fma", 16, {"avx2", "fma"}),
    "fp32 FMA (vfmadd231ps zmm)": ("fp32_fma_zmm", 32, {"avx512f"}),
    "bf16 dot (vdpbf16ps zmm)": ("bf16_dot_zmm", 64, {"avx512f", "avx512_bf16"}),
    "int8 vpmaddubsw ymm": ("int8_maddubs", 64, {"avx2"}),
    "int8 vpmaddubsw + vpaddw ymm": ("int8_maddubs_add", 64, {"avx2"}),
    "int8 vpdpbusd zmm (VNNI)": ("int8_vnni", 128, {"avx512f", "avx512_vnni"}),
    "AVX2 q8 kernel mix (a row x 16 cols)": ("q8_kernel_mix", 16 * 64, {"avx2", "fma"}),
}


def build(workdir: Path) -> ctypes.CDLL:
    src, lib = workdir / "isa_peaks.c", workdir / "isa_peaks.so"
    src.write_text(SOURCE)
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-O2", "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    dll = ctypes.CDLL(str(lib))
    for fn, _, _ in LOOPS.values():
        getattr(dll, fn).argtypes, getattr(dll, fn).restype = [ctypes.c_long], ctypes.c_long
    return dll


def on_threads(fn, iters: int, threads: int) -> float:
    """Seconds for `threads` threads each running fn(iters) at once (ctypes drops the GIL)."""
    start = threading.Barrier(threads + 1)
    workers = [threading.Thread(target=lambda: (start.wait(), fn(iters))) for _ in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    return time.perf_counter() - t0


def peak_gops(fn, ops: int, threads: int, seconds: float) -> float:
    """Best of 3 runs sized to about `seconds` each, in G ops a second over all threads."""
    iters = 100_000
    while (elapsed := on_threads(fn, iters, 1)) < 0.05:
        iters *= 4
    iters = max(1, int(iters * seconds / elapsed))
    best = min(on_threads(fn, iters, threads) for _ in range(3))
    units = fn(1)  # what one iteration counts: 12 instructions of a chain loop, or one pass of the mix
    return iters * units * ops * threads / best / 1e9


def kernel_gops(threads: int) -> dict[str, float]:
    """oneDNN's float32 GEMM and the q8 kernels, as GOP/s (2 ops a product) on `threads` threads."""
    from llmserve.kernels import cpu_kernels
    from llmserve.model.gguf_quant import quantize

    torch.set_num_threads(threads)

    def best_rate(fn, ops: float) -> float:
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return ops / min(times) / 1e9

    out = {}
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    out["oneDNN float32 GEMM 2048^3"] = best_rate(
        lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""), 2 * 2048 ** 3)
    kernels = cpu_kernels()
    if kernels is None:
        return out
    g = torch.Generator().manual_seed(0)
    k, n, rows = 576, 1536, 512
    x = torch.randn(rows, k, generator=g)
    for fmt, name in ((0, "q4_1"), (1, "q8_0")):
        tiles = kernels.gguf_q8_pack(quantize(torch.randn(n, k, generator=g) * 0.05, name), fmt)
        out[f"q8 kernel, {name.upper()} weights, {k}->{n} x {rows} rows"] = best_rate(
            lambda t=tiles, f=fmt: kernels.gguf_linear_q8(x, t, f, n, torch.empty(0), -1), 2.0 * rows * n * k)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seconds", type=float, default=0.5, help="about how long each peak loop runs")
    ap.add_argument("--no-kernels", action="store_true", help="the instruction peaks only")
    args = ap.parse_args()

    flags = cpu_features()
    with tempfile.TemporaryDirectory() as tmp:
        dll = build(Path(tmp))
        peaks = {name: peak_gops(getattr(dll, fn), ops, args.threads, args.seconds)
                 for name, (fn, ops, needs) in LOOPS.items() if needs <= flags}
    print(f"{args.threads} thread(s); G ops a second (an FMA or a product = 2 ops)")
    for name, gops in peaks.items():
        print(f"  peak {name:32} {gops:8.1f}")
    # A float32 GEMM uses the widest FMA the CPU has.
    fma = max(peaks["fp32 FMA (vfmadd231ps ymm)"], peaks.get("fp32 FMA (vfmadd231ps zmm)", 0.0))
    mix = peaks.get("AVX2 q8 kernel mix (a row x 16 cols)")
    pair = peaks["int8 vpmaddubsw + vpaddw ymm"]
    print(f"  int8 with its adds / fp32 FMA: {pair / fma:.2f}x")
    if mix:
        print(f"  AVX2 q8 kernel mix / fp32 FMA: {mix / fma:.2f}x")
    if args.no_kernels:
        return
    vnni = peaks.get("int8 vpdpbusd zmm (VNNI)")
    for name, gops in kernel_gops(args.threads).items():
        if "float32" in name:
            peak, of = fma, "fp32 FMA"
        else:  # the q8 kernels run their VNNI path where the CPU has one
            peak, of = (vnni, "VNNI") if vnni else (pair, "int8 + add")
            if not vnni and mix and "Q4_1" in name:  # the mix is the Q4_1 (nibble) kernel's
                of += f"; {100 * gops / mix:.0f}% of its instruction mix's"
        print(f"  {name:48} {gops:8.1f}  ({100 * gops / peak:.0f}% of the {of} peak)")


if __name__ == "__main__":
    main()
