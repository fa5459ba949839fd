"""The planner's workload replayed offline through replicas: where a placement's served goodput
parts from the simulation, without HTTP in the way (issue 17).

The same requests the planner simulates (`poisson_requests`, the lengths `planner_check.py` sends)
are added to `LLM(replicas=...)` at their arrival times, greedy, random prompt ids; every replica
step is logged with its shape and whole-step seconds. Printed: replayed beside simulated
attainment and medians; the step-time model's error on the steps the replicas actually ran (decode
steps and steps with a prompt chunk apart); how long replicas sat with work waiting for the front
end (the Ray round trip and the front's share of a step, which the simulator does not count); and,
with --per-request, each request's TTFT and TPOT against the simulation's.

Usage: python benchmarks/planner_replay.py --plan bench-results/planner_check/plan.json --rate 0.744
       [--replicas 2 | --prefill-replicas 1 --decode-replicas 1] [--num-prompts 40] [--per-request]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmserve.bench.workloads import sample_lengths  # noqa: E402
from llmserve.cluster.planner import Placement, StepTimeModel, poisson_requests, simulate  # noqa: E402


def replay(llm, requests, seed: int = 1) -> tuple[dict[int, float], dict[int, float]]:
    """TTFT and TPOT (seconds) of each request, sent at its arrival time; prompts are random ids."""
    from llmserve.sampling_params import SamplingParams

    engine = llm.engine
    rng = np.random.default_rng(seed)
    vocab = engine.model_config.vocab_size
    prompts = [rng.integers(1000, vocab, r.prompt).tolist() for r in requests]
    ttft, tpot, first = {}, {}, {}
    start = time.monotonic()
    sent = 0
    while sent < len(requests) or engine.has_unfinished_requests():
        now = time.monotonic() - start
        while sent < len(requests) and requests[sent].arrival <= now:
            r = requests[sent]
            engine.add_request(str(sent), prompts[sent], SamplingParams(temperature=0, max_tokens=r.output,
                                                                        ignore_eos=True),
                               arrival_time=start + r.arrival)
            sent += 1
        if not engine.has_unfinished_requests():
            time.sleep(min(0.005, max(0.0, requests[sent].arrival - now)))
            continue
        for out in engine.step():
            i, t, n = int(out.request_id), time.monotonic() - start, len(out.outputs[0].token_ids)
            if i not in first and n:
                first[i], ttft[i] = t, t - requests[i].arrival
            if out.finished and i in first:
                tpot[i] = (t - first[i]) / max(1, n - 1)
    return ttft, tpot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", required=True, help="a plan.json written by planner_check.py / llmserve plan")
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--replicas", type=int, default=2, help="at least 2 (one replica is served in-process)")
    ap.add_argument("--prefill-replicas", type=int, default=0)
    ap.add_argument("--decode-replicas", type=int, default=0)
    ap.add_argument("--num-prompts", type=int, default=40)
    ap.add_argument("--max-input-len", type=int, default=512)
    ap.add_argument("--max-output-len", type=int, default=128)
    ap.add_argument("--ttft-slo", type=float, default=2.0)
    ap.add_argument("--tpot-slo", type=float, default=0.2)
    ap.add_argument("--per-request", action="store_true")
    args = ap.parse_args()
    if args.prefill_replicas == 0 and args.replicas < 2:
        ap.error("--replicas must be at least 2 (one replica is served in-process, without replicas' step log)")
    os.environ.setdefault("LLMSERVE_NUM_THREADS", "2")
    from llmserve import LLM

    cores = int(os.environ["LLMSERVE_NUM_THREADS"])
    split = args.prefill_replicas > 0
    replicas = args.prefill_replicas + args.decode_replicas if split else args.replicas
    placement = Placement(replicas, max(1, cores // replicas), 512, args.prefill_replicas)
    plan = json.loads(Path(args.plan).read_text())
    model = StepTimeModel(**plan["models"][str(placement.threads)])
    lengths = sample_lengths("chat", args.num_prompts, seed=0, max_input_len=args.max_input_len,
                             max_output_len=args.max_output_len)
    requests = poisson_requests(lengths, args.rate)
    sim = simulate(placement, model, requests, plan.get("transfer_s_per_token", 0.0))
    kwargs = ({"prefill_replicas": args.prefill_replicas, "decode_replicas": args.decode_replicas} if split
              else {"replicas": args.replicas})
    llm = LLM(max_model_len=4096, **kwargs)
    engine = llm.engine
    engine.step_log = []
    try:
        ttft, tpot = replay(llm, requests)
    finally:
        waited, steps_waited, log = engine.waited_s, engine.steps_waited, list(engine.step_log)
        cpu = engine.step_cpu_s
        llm.shutdown()
    ok = sum(1 for i in ttft if ttft[i] <= args.ttft_slo and tpot.get(i, 0.0) <= args.tpot_slo) / len(requests)
    sim_tpot = [t for t in sim.tpot if t > 0]
    print(f"{placement} at {args.rate} req/s: attainment replayed {ok:.2f} simulated "
          f"{sim.attainment(args.ttft_slo, args.tpot_slo):.2f}; TTFT p50 {np.median(list(ttft.values())):.2f} / "
          f"{np.median(sim.ttft):.2f} s; TPOT p50 {np.median([t for t in tpot.values() if t > 0]) * 1e3:.0f} / "
          f"{np.median(sim_tpot) * 1e3:.0f} ms")
    measured = np.array([s for *_, s in log])
    predicted = np.array([model.step_s(p, d, c) for _, p, d, c, _ in log])
    chunk = np.array([p > 0 for _, p, *_ in log])
    print(f"{len(log)} replica steps: measured {measured.sum():.1f} s ({cpu:.1f} CPU-s in the replicas), "
          f"the step-time model {predicted.sum():.1f} s")
    for name, sel in (("decode only", ~chunk), ("with a prompt chunk", chunk)):
        if sel.any():
            print(f"  {name}: {sel.sum()} steps, measured {measured[sel].sum():.1f} s, "
                  f"model {predicted[sel].sum():.1f} s, "
                  f"median measured / model {np.median(measured[sel] / predicted[sel]):.2f}")
    if steps_waited:
        print(f"replicas waited on the front end before {steps_waited} steps: {waited:.1f} s in all, "
              f"{waited / steps_waited * 1e3:.1f} ms a step")
    if args.per_request:
        for i, r in enumerate(requests):
            got = ttft.get(i, float("nan"))  # nan: ended without a token
            print(f"request {i:3d} at {r.arrival:7.2f} s, {r.prompt:4d} -> {r.output:4d} tokens: TTFT {got:5.2f} / "
                  f"{sim.ttft[i]:5.2f} s, TPOT {tpot.get(i, 0) * 1e3:4.0f} / {sim.tpot[i] * 1e3:4.0f} ms")


if __name__ == "__main__":
    main()
