"""`llmserve plan`: profile this engine's steps on this machine, then rank placements by simulated
goodput per core (cluster/planner.py)."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def add_plan_parser(sub) -> None:
    from llmserve.cli import add_engine_args

    p = sub.add_parser("plan", help="rank placements (replicas x threads, prefill/decode split, token budget) "
                                    "by simulated goodput per core, from a profile of this engine")
    add_engine_args(p)
    p.add_argument("--cores", type=int, default=None, help="cores to place on (default: this machine's)")
    p.add_argument("--workload", default="chat", choices=["chat", "code", "summarization"])
    p.add_argument("--num-requests", type=int, default=200, help="requests simulated per rate tried")
    p.add_argument("--max-input-len", type=int, default=1024)
    p.add_argument("--max-output-len", type=int, default=256)
    # --ttft-slo and --tpot-slo come with the engine arguments (seconds; the planner's defaults: 2 and 0.2)
    p.add_argument("--budgets", default="256,512", help="token budgets to consider")
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=_cmd_plan)


def _cmd_plan(args: argparse.Namespace) -> None:
    import torch

    from llmserve.bench.workloads import sample_lengths
    from llmserve.cli import engine_kwargs
    from llmserve.cluster.planner import candidate_placements, describe, profile_replicated, profile_steps, rank
    from llmserve.entrypoints.llm import LLM

    ttft_slo = args.ttft_slo if args.ttft_slo is not None else 2.0
    tpot_slo = args.tpot_slo if args.tpot_slo is not None else 0.2
    cores = args.cores or int(os.environ.get("LLMSERVE_NUM_THREADS", 0)) or os.cpu_count() or 1
    kwargs = engine_kwargs(args)
    kwargs.update(replicas=1, prefill_replicas=0, decode_replicas=0, autoscale=None)
    llm = LLM(**kwargs)
    threads = [t for t in range(1, cores + 1) if cores % t == 0]
    models = {}
    for t in threads:
        start = time.perf_counter()
        # With fewer threads than cores, cores // t replicas share the host: they profile together,
        # as Ray replicas behind this process (a single replica is served in-process).
        models[t] = profile_steps(llm, t) if t == cores else profile_replicated(kwargs, cores // t, cores)
        print(f"step model at {t} thread{'s' if t > 1 else ''}{'' if t == cores else f' ({cores // t} at once)'}: "
              f"{describe(models[t])} (profiled in {time.perf_counter() - start:.0f} s)")
    torch.set_num_threads(cores)
    transfer = _transfer_s_per_token(llm)
    lengths = sample_lengths(args.workload, args.num_requests, seed=0, max_input_len=args.max_input_len,
                             max_output_len=args.max_output_len)
    budgets = tuple(int(b) for b in args.budgets.split(","))
    ranked = rank(candidate_placements(cores, budgets), models, lengths, ttft_slo, tpot_slo, transfer)
    print(f"\n{args.workload} workload, TTFT SLO {ttft_slo} s, TPOT SLO {tpot_slo * 1e3:.0f} ms, "
          f">= 90% meeting both; {cores} cores")
    print(f"{'placement':48}{'goodput req/s':>15}{'per core':>10}")
    for placement, rate in ranked:
        print(f"{str(placement):48}{rate:15.3f}{rate / placement.cores:10.3f}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({
            "models": {t: vars(m) for t, m in models.items()}, "transfer_s_per_token": transfer,
            "ranked": [{"placement": str(p), "goodput": r, "per_core": r / p.cores} for p, r in ranked]}, indent=2))


def _transfer_s_per_token(llm) -> float:
    """Seconds per token to move a request's KV out of one engine and into another (export, then
    import), measured on 64 blocks of this engine: the in-process part of a prefill -> decode move."""
    runner = llm.engine.runner
    if not runner.kv_pages:  # no attention layers (Mamba-2): nothing but a state slot moves
        return 0.0
    bs = runner.block_size
    blocks = list(range(min(64, runner.kv_caches[0][0].shape[0] // bs)))
    start = time.perf_counter()
    kv = runner.export_kv([blocks], None, len(blocks) * bs)
    runner.import_kv([blocks], None, kv)
    return (time.perf_counter() - start) / (len(blocks) * bs)
