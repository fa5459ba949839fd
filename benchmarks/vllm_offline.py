#!/usr/bin/env python
"""vLLM's offline `LLM.generate` on a workload file, timed like `llmserve bench throughput`.

Runs under vLLM's own interpreter (benchmarks/vs_vllm.sh installs it in its own venv); imports
nothing from llmserve. The workload file is JSONL with prompt_token_ids and output_len per line
(`benchmarks/vs_vllm.py` writes it), so both engines get the very same prompts.

    bench-results/vllm-venv/bin/python benchmarks/vllm_offline.py --model FOLDER \
        --workload-file w.jsonl --dtype float32 --output-json vllm.json
"""
from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--workload-file", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(args.workload_file) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    prompts = [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in rows]
    params = [SamplingParams(temperature=args.temperature, max_tokens=r["output_len"], ignore_eos=True) for r in rows]
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, seed=0)
    llm.generate([TokensPrompt(prompt_token_ids=[11] * 16)], SamplingParams(max_tokens=4, ignore_eos=True),
                 use_tqdm=False)  # warm-up, untimed, as llmserve bench throughput does
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    total_in = sum(len(o.prompt_token_ids) for o in outs)
    total_out = sum(len(c.token_ids) for o in outs for c in o.outputs)
    import torch
    import vllm

    # What this process actually runs with (benchmarks/vs_vllm.py sets these; the engine core and its
    # worker are child processes and inherit them).
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        maps = ""
    loaded = sorted({line.split()[-1] for line in maps.splitlines()
                     if any(k in line for k in ("libtcmalloc", "libiomp5", "libgomp"))})
    settings = {k: os.environ.get(k) for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE",
                                               "VLLM_CPU_NUM_OF_RESERVED_CPU", "LD_PRELOAD", "OMP_NUM_THREADS")}
    res = {"engine": "vllm", "vllm_version": vllm.__version__, "torch_version": torch.__version__, "dtype": args.dtype,
           "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
           "env": settings, "libraries_loaded": loaded,
           "elapsed_time": elapsed, "num_requests": len(outs),
           "total_prompt_tokens": total_in, "total_output_tokens": total_out, "total_num_tokens": total_in + total_out,
           "requests_per_second": len(outs) / elapsed, "output_tokens_per_second": total_out / elapsed,
           "tokens_per_second": (total_in + total_out) / elapsed}
    print(f"vLLM throughput: {res['requests_per_second']:.3f} requests/s, {res['tokens_per_second']:.2f} total "
          f"tokens/s, {res['output_tokens_per_second']:.2f} output tokens/s ({elapsed:.1f} s)", flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
