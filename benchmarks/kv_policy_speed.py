"""KV policies and the disk tier: speed and memory, against full KV and recomputing, in one run.

    .venv/bin/python benchmarks/kv_policy_speed.py [--requests 16] [--output-len 512] [--blocks 160]

(1) Long generations in a KV cache too small for them under `full`: --requests random prompts of
    --input-len tokens each generate --output-len tokens (greedy, ignore_eos) in an engine with
    --blocks blocks of 16. `full` preempts and recomputes; each lossy policy with --budget tokens
    fits. Output tok/s over the run, p99 over requests of their mean time per output token, and
    preemptions.
(2) A --prefix-len prompt whose prefix blocks were evicted from memory: its TTFT when they are read
    back from the disk tier against computing it again (prefix caching off), best of --runs.
Results: bench-results/kv_policy_speed.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llmserve.entrypoints.llm import LLM
from llmserve.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[1]


def run_workload(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> dict:
    engine = llm.engine
    before = engine.scheduler.num_preemptions
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tpot = []
    for o in outs:
        m, n = o.metrics, len(o.outputs[0].token_ids)
        tpot.append((m["finished_time"] - m["first_token_time"]) / max(n - 1, 1))
    return {"output_tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / elapsed,
            "p99_tpot_ms": 1000 * float(np.percentile(tpot, 99)), "seconds": elapsed,
            "preemptions": engine.scheduler.num_preemptions - before,
            "evicted_tokens": sum(o.num_evicted_tokens for o in outs)}


def ttft(llm: LLM, prompt: list[int]) -> float:
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0]
    return out.metrics["first_token_time"] - out.metrics["arrival_time"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=512)
    ap.add_argument("--blocks", type=int, default=160)
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--policies", default="full,streaming,h2o,keyformer")
    ap.add_argument("--prefix-len", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", default=str(ROOT / "bench-results" / "kv_policy_speed.json"))
    args = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    results: dict = {"args": vars(args), "policies": {}}
    llm = LLM(num_kv_blocks=args.blocks, enable_prefix_caching=False)
    vocab = llm.engine.model_config.vocab_size
    prompts = [torch.randint(0, vocab, (args.input_len,), generator=g).tolist() for _ in range(args.requests)]
    print(f"(1) {args.requests} x {args.input_len} -> {args.output_len}, {args.blocks} blocks of 16 "
          f"({args.blocks * 16} tokens; the workload needs {args.requests * (args.input_len + args.output_len)} "
          f"under full), budget {args.budget} tokens")
    for policy in args.policies.split(","):
        params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True,
                                kv_policy=policy, kv_budget=None if policy == "full" else args.budget, seed=0)
        r = run_workload(llm, prompts, params)
        results["policies"][policy] = r
        print(f"  {policy:>10}: {r['output_tok_s']:7.1f} output tok/s, p99 TPOT {r['p99_tpot_ms']:6.1f} ms, "
              f"{r['preemptions']} preemptions, {r['evicted_tokens']} tokens evicted", flush=True)
    llm.shutdown()

    print(f"(2) TTFT of a {args.prefix_len}-token prompt whose prefix was evicted to the disk tier, vs recomputed")
    with tempfile.TemporaryDirectory() as tier_root:
        blocks = args.prefix_len // 16 + 8
        tiered = LLM(num_kv_blocks=blocks, kv_offload_dir=tier_root)
        fresh = LLM(num_kv_blocks=blocks, enable_prefix_caching=False)
        disk, recompute = [], []
        for i in range(args.runs):
            prompt = torch.randint(0, vocab, (args.prefix_len,), generator=g).tolist()
            filler = torch.randint(0, vocab, (args.prefix_len,), generator=g).tolist()
            ttft(tiered, prompt)
            ttft(tiered, filler)  # pushes the prompt's blocks out of memory, onto disk
            hits = tiered.engine.kv.disk_hits
            disk.append(ttft(tiered, prompt))
            assert tiered.engine.kv.disk_hits > hits, "the prompt was not read back from disk"
            recompute.append(ttft(fresh, prompt))
        results["disk_tier"] = {"ttft_disk_s": min(disk), "ttft_recompute_s": min(recompute),
                                "bytes_read": tiered.engine.tier.bytes_read}
        print(f"  read back from disk {1000 * min(disk):7.1f} ms, recomputed {1000 * min(recompute):7.1f} ms: "
              f"{min(recompute) / min(disk):.2f}x", flush=True)
        tiered.shutdown()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
