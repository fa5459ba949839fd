"""Scale-out cost (issue 17): the time from a scale-out decision to the new replica's first token,
and the resident memory of 1, 2 and 3 replicas, with the weights held once per host (replicas map
them from Ray's object store) against every replica loading its own.

For each mode an LLM with one replica of the embedded model starts; then two replicas are added one
at a time. Each addition is timed from add_replica() to the first token of a 64-token prompt run on
that replica alone ("cold": it loads the converted model folder, whose files are in the page cache
by then, and builds its layers; "shared": it maps the chunks). Memory per replica is read from
/proc/<pid>/smaps_rollup: its private pages, and its proportional share (PSS) of pages it shares.

Usage: python benchmarks/scale_out.py [--runs 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from llmserve.entrypoints.llm import LLM
from llmserve.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[1]


def first_token_on(engine, replica: int, prompt: list[int]) -> None:
    import ray

    actor = engine.replicas[replica]
    ray.get(actor.add_request.remote("probe", prompt, SamplingParams(temperature=0, max_tokens=1), None, 0, None,
                                     None, None))
    while True:
        outputs = ray.get(actor.step.remote()).outputs
        if any(o.request_id == "probe" and o.outputs[0].token_ids for o in outputs):
            return


def run(shared: bool) -> dict:
    # A replicated engine of one replica (autoscale bounds; the SLOs never ask it to act: no step runs
    # through it here anyway), each replica with one thread.
    llm = LLM(autoscale="1:3", ttft_slo=1e6, tpot_slo=1e6, share_weights=shared, num_kv_blocks=64)
    engine = llm.engine
    prompt = np.random.default_rng(0).integers(100, 10_000, 64).tolist()
    try:
        first_token_on(engine, 0, prompt)
        seconds, memory = [], [engine.replica_memory()]
        for _ in range(2):
            start = time.perf_counter()
            index = engine.add_replica()
            first_token_on(engine, index, prompt)
            seconds.append(time.perf_counter() - start)
            memory.append(engine.replica_memory())
        return {"seconds_to_first_token": seconds,
                "memory_mb": [{"private": sum(m["private"] for m in ms) / 1024, "pss": sum(m["pss"] for m in ms) / 1024}
                              for ms in memory]}
    finally:
        llm.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--json", default=str(ROOT / "bench-results" / "scale_out.json"))
    args = ap.parse_args()
    results = {mode: [run(mode == "shared") for _ in range(args.runs)] for mode in ("cold", "shared")}
    print("time from add_replica() to the new replica's first token (median of the 2nd and 3rd replica, "
          f"{args.runs} runs):")
    med = {m: statistics.median(s for r in rs for s in r["seconds_to_first_token"]) for m, rs in results.items()}
    for mode, value in med.items():
        print(f"  {mode:7} {value:6.2f} s")
    print(f"  cold / shared: {med['cold'] / med['shared']:.2f}x")
    print("resident memory of all replicas (MB, last run): private | PSS")
    for n in range(3):
        row = "  ".join(f"{mode} {rs[-1]['memory_mb'][n]['private']:7.0f} | {rs[-1]['memory_mb'][n]['pss']:7.0f}"
                        for mode, rs in results.items())
        print(f"  {n + 1} replica{'s' if n else ' '}: {row}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
