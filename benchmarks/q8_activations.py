"""8-bit activations (--activations q8, csrc/gguf_q8act.cpp) against float32 activations
(csrc/gguf_gemm.cpp) on the same GGUF weights, side by side in one run:

  (a) one linear layer, Q4_1 weights as SmolLM2 publishes them: 576 -> 1536 and 1536 -> 576, at
      1, 4, 64 and 512 rows of x; gguf_linear on the blocks vs gguf_linear_q8 on the tiles a q8
      layer packs them into, on the best path this CPU has (and on each other path it can run);
  (b) W2-like single-stream decode on the embedded model: `LLM()` and `LLM(activations="q8")`,
      one request at a time, 128 random prompt tokens -> 128 output tokens, TPOT and TTFT.

Usage: python benchmarks/q8_activations.py [--iters N] [--runs N] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmserve.model.gguf_quant import Q8_PATHS, quantize

Q4_1 = 0


def timed(fns: dict, iters: int) -> dict[str, tuple[float, float]]:
    """Median and fastest seconds per call of each function; calls take turns, so a load that comes
    and goes on the machine falls on all of them alike."""
    for _ in range(3):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}


def layers(kernels, iters: int) -> None:
    paths = kernels.gguf_q8_paths()
    g = torch.Generator().manual_seed(0)
    print(f"(a) one Q4_1 linear layer; q8 paths here: {', '.join(Q8_PATHS[p] for p in paths)} "
          f"(best: {Q8_PATHS[paths[-1]]}); median ms (fastest), float/q8 ratio of medians")
    for k, n in ((576, 1536), (1536, 576)):
        blocks = quantize(torch.randn(n, k, generator=g) * 0.05, "q4_1")
        tiles = kernels.gguf_q8_pack(blocks, Q4_1)  # as a q8 layer holds its weights
        bias = torch.empty(0)
        for rows in (1, 4, 64, 512):
            x = torch.randn(rows, k, generator=g)
            fns = {"float32": lambda: kernels.gguf_linear(x, blocks, Q4_1, bias)}
            for p in reversed(paths[1:] if len(paths) > 1 else paths):
                fns[f"q8 {Q8_PATHS[p]}"] = lambda p=p: kernels.gguf_linear_q8(x, tiles, Q4_1, n, bias, p)
            res = timed(fns, iters if rows < 512 else max(5, iters // 5))
            base = res["float32"][0]
            cells = [f"float32 {base * 1e3:7.3f} ({res['float32'][1] * 1e3:.3f})"]
            cells += [f"{name} {med * 1e3:7.3f} ({fast * 1e3:.3f}) = {base / med:4.2f}x"
                      for name, (med, fast) in res.items() if name != "float32"]
            print(f"  {k:>4} -> {n:<4} x {rows:>3} rows: " + " | ".join(cells))


def w2(llm, prompt: list[int], out_len: int) -> tuple[float, float]:
    """One request through the engine's step loop: (TTFT, TPOT) in seconds."""
    from vs_transformers import llmserve_w2  # benchmarks/ is this script's directory

    r = llmserve_w2(llm, prompt, out_len)
    return r["ttft_s"], r["tpot_s"]


def decode(runs: int, prompt_len: int, out_len: int) -> None:
    from llmserve import LLM

    llms = {"float32": LLM(), "q8": LLM(activations="q8")}
    g = torch.Generator().manual_seed(1)
    vocab = llms["float32"].engine.model_config.vocab_size
    print(f"(b) embedded model, 1 stream, {prompt_len} random prompt tokens -> {out_len} output, {runs} runs "
          "each (a fresh prompt per run, taking turns)")
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in llms}
    w2(llms["float32"], torch.randint(0, vocab, (prompt_len,), generator=g).tolist(), 8)  # warm-up
    w2(llms["q8"], torch.randint(0, vocab, (prompt_len,), generator=g).tolist(), 8)
    for _ in range(runs):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
        for name, llm in llms.items():
            results[name].append(w2(llm, prompt, out_len))
    summary = {}
    for name, rs in results.items():
        ttft = statistics.median(r[0] for r in rs)
        tpot = statistics.median(r[1] for r in rs)
        summary[name] = (ttft, tpot)
        print(f"  {name:8} TTFT {ttft * 1e3:7.1f} ms (best {min(r[0] for r in rs) * 1e3:.1f})   "
              f"TPOT {tpot * 1e3:6.2f} ms (best {min(r[1] for r in rs) * 1e3:.2f})")
    (f_ttft, f_tpot), (q_ttft, q_tpot) = summary["float32"], summary["q8"]
    print(f"  float32/q8 of medians: TTFT {f_ttft / q_ttft:.2f}x, TPOT {f_tpot / q_tpot:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch threads for (a) (default: torch's)")
    ap.add_argument("--skip-layers", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    args = ap.parse_args()
    from llmserve.kernels import cpu_kernels

    kernels = cpu_kernels()
    if kernels is None:
        raise SystemExit("the CPU kernels are unavailable here (no compiler?)")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_layers:
        layers(kernels, args.iters)
    if not args.skip_decode:
        decode(args.runs, args.prompt_len, args.output_len)


if __name__ == "__main__":
    main()
