"""A/B of two commits of llmserve in the same run: W1 offline throughput and W2 single-stream TPOT.

    .venv/bin/python benchmarks/ab_commits.py BASE_REF [--head-ref HEAD] [--repeats 2]
    .venv/bin/python benchmarks/ab_commits.py BASE_REF --llm-kwargs '{"activations": "q8", "kv_cache_dtype": "float16"}'

Each ref is checked out into bench-results/ab-<ref> (a git worktree) and imported from there by
a fresh process (PYTHONPATH first), so both run the same venv, model and machine; runs alternate
base, head, base, head... and the best of each side is compared. Kernels are built by each
checkout as it builds them (the first run of a ref pays that, outside the timed part).

W1: 64 requests x 256 random prompt tokens -> exactly 128 output tokens, temperature 1.0, offline.
W2: one request, 128 random prompt tokens -> 128 output tokens, greedy; TTFT and TPOT from step times.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench-results"

# Runs inside the checkout under test; uses only APIs both sides have (LLM, engine.add_request/step).
PROBE = r"""
import json, sys, time
import torch
from llmserve import LLM, SamplingParams
which = sys.argv[1]
llm = LLM(**json.loads(sys.argv[2]))
engine = llm.engine
vocab = engine.model_config.vocab_size
g = torch.Generator().manual_seed(0)
def prompts(n, length):
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]
llm.generate(prompts(2, 32), SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
if which == "w1":
    ps = prompts(64, 256)
    params = SamplingParams(temperature=1.0, max_tokens=128, ignore_eos=True, seed=1)
    start = time.perf_counter()
    outs = llm.generate(ps, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    print(json.dumps({"output_tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / elapsed}))
else:
    engine.add_request("w2", prompts(1, 128)[0], SamplingParams(temperature=0, max_tokens=128, ignore_eos=True))
    start, times = time.perf_counter(), []
    while engine.has_unfinished_requests():
        for out in engine.step():
            n = len(out.outputs[0].token_ids)
            times.extend([time.perf_counter()] * (n - len(times)))
    ttft = times[0] - start
    print(json.dumps({"ttft_ms": 1000 * ttft, "tpot_ms": 1000 * (times[-1] - times[0]) / (len(times) - 1)}))
"""


def worktree(ref: str) -> Path:
    sha = subprocess.check_output(["git", "rev-parse", "--short", ref], cwd=ROOT, text=True).strip()
    path = RESULTS / f"ab-{sha}"
    if not path.exists():
        subprocess.check_call(["git", "worktree", "add", "--detach", str(path), sha], cwd=ROOT)
    return path


def run(checkout: Path, workload: str, llm_kwargs: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    out = subprocess.check_output([sys.executable, "-c", PROBE, workload, llm_kwargs], cwd=checkout, env=env,
                                  text=True)
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base_ref")
    ap.add_argument("--head-ref", default=None, help="unset: the working tree itself")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workloads", default="w1,w2", help="which of w1, w2 to run")
    ap.add_argument("--llm-kwargs", default="{}", help="JSON of LLM() arguments both sides run with")
    ap.add_argument("--json", default=str(RESULTS / "ab_commits.json"))
    args = ap.parse_args()
    json.loads(args.llm_kwargs)  # fail here, not in every child
    RESULTS.mkdir(exist_ok=True)
    sides = {"base": worktree(args.base_ref), "head": worktree(args.head_ref) if args.head_ref else ROOT}
    workloads = args.workloads.split(",")
    results: dict[str, dict[str, list[dict]]] = {s: {w: [] for w in workloads} for s in sides}
    for _ in range(args.repeats):
        for workload in workloads:
            for side, path in sides.items():
                r = run(path, workload, args.llm_kwargs)
                results[side][workload].append(r)
                print(side, workload, r, flush=True)
    best: dict[str, dict[str, float]] = {s: {} for s in sides}
    ratios: dict[str, float] = {}
    for s in sides:
        if "w1" in workloads:
            best[s]["w1_output_tok_s"] = max(r["output_tok_s"] for r in results[s]["w1"])
        if "w2" in workloads:
            best[s]["w2_tpot_ms"] = min(r["tpot_ms"] for r in results[s]["w2"])
            best[s]["w2_ttft_ms"] = min(r["ttft_ms"] for r in results[s]["w2"])
    if "w1" in workloads:
        ratios["w1_throughput_head_over_base"] = best["head"]["w1_output_tok_s"] / best["base"]["w1_output_tok_s"]
    if "w2" in workloads:
        ratios["w2_tpot_base_over_head"] = best["base"]["w2_tpot_ms"] / best["head"]["w2_tpot_ms"]
        ratios["w2_ttft_base_over_head"] = best["base"]["w2_ttft_ms"] / best["head"]["w2_ttft_ms"]
    report = {"base_ref": args.base_ref, "head_ref": args.head_ref or "working tree",
              "llm_kwargs": json.loads(args.llm_kwargs), "runs": results,
              "best": best, "ratios": ratios}
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps({"best": best, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
