"""The goodput planner's predictions against measured `llmserve bench serve` runs (issue 17).

`llmserve plan` profiles the engine at each thread count and predicts each placement's goodput
(the highest Poisson rate at which >= 90% of requests meet both SLOs) for the very workload the
check then sends: the same N requests (lengths from the same seed) arriving at the same times as
`llmserve bench serve` sends them, so the prediction and the measurement differ only by the step-time
model and the simulator, not by a longer or shorter run (a short run never builds the queue a long
one does). Three placements of the cores are then served for real: 1 replica with all threads,
2 replicas with half each, and 1 prefill + 1 decode replica; each is swept at rates around its
predicted goodput, and its measured goodput is the highest swept rate whose attainment is >= 90%.
Beside each swept rate the simulated attainment and TTFT/TPOT medians are printed.

Usage: python benchmarks/planner_check.py [--num-prompts 40] [--rates 0.5,0.75,1.0,1.25,1.5,2.0]
(rates: multiples of each placement's predicted goodput). Results: bench-results/planner_check/.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from replicas import free_port, serve  # noqa: E402 - the same server start as the replicas benchmark

from llmserve.bench.workloads import sample_lengths  # noqa: E402
from llmserve.cluster.planner import Placement, StepTimeModel, poisson_requests, simulate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLACEMENTS = {"1 replica x 2 threads, budget 512": (Placement(1, 2, 512), []),
              "2 replicas x 1 thread, budget 512": (Placement(2, 1, 512), ["--replicas", "2"]),
              "1 prefill + 1 decode x 1 thread, budget 512": (Placement(2, 1, 512, prefill_replicas=1),
                                                              ["--prefill-replicas", "1", "--decode-replicas", "1"])}


def serve_and_sweep(flags: list[str], rates: list[float], shape: list[str], args, log: Path, result: Path) -> dict:
    """Serve one placement and sweep it with `llmserve bench serve`; the bench's JSON."""
    port = free_port()
    proc = serve(flags, port, 2, log)
    url = f"http://127.0.0.1:{port}"
    try:
        # Warm the server (first-call allocations, the kernels' first shapes) on prompts the sweep never sends.
        subprocess.run([sys.executable, "-m", "llmserve.cli", "bench", "serve", "--base-url", url, *shape,
                        "--num-prompts", "4", "--request-rate", "inf", "--workload-seed", "99", "--ignore-eos",
                        "--disable-tqdm", "--no-plot", "--output-json", str(result.with_suffix(".warmup.json"))],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "-m", "llmserve.cli", "bench", "serve", "--base-url", url,
                        *shape, "--num-prompts", str(args.num_prompts), "--request-rate", ",".join(map(str, rates)),
                        "--workload-seed", "0", "--temperature", "0", "--ignore-eos",
                        "--goodput", f"ttft:{args.ttft_slo * 1e3:g}", f"tpot:{args.tpot_slo * 1e3:g}",
                        "--disable-tqdm", "--no-plot", "--request-timeout", "900", "--output-json", str(result)],
                       check=True, stdout=subprocess.DEVNULL)
        return json.loads(result.read_text())
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)


def compare(placement: Placement, model: StepTimeModel, transfer: float, lengths: list[tuple[int, int]],
            run: dict, args) -> dict:
    """One swept rate: the simulator's attainment and medians beside the measured ones."""
    sim = simulate(placement, model, poisson_requests(lengths, run["request_rate"]), transfer)
    m = run["metrics"]
    return {"rate": run["request_rate"],
            "simulated_attainment": sim.attainment(args.ttft_slo, args.tpot_slo),
            "measured_attainment": m.get("slo_attainment"),
            "simulated_ttft_p50_s": float(np.median(sim.ttft)), "measured_ttft_p50_s": m["median_ttft_ms"] / 1e3,
            "simulated_tpot_p50_s": float(np.median([t for t in sim.tpot if t > 0])),
            "measured_tpot_p50_s": m["median_tpot_ms"] / 1e3}


def crossing(points: list[tuple[float, float]], target: float) -> float | None:
    """The rate at which attainment falls through `target`, interpolated linearly between the last
    swept rate that meets it and the next (a sweep of a few rates brackets goodput; this reads it)."""
    points = sorted(points)
    for (r0, a0), (r1, a1) in zip(points, points[1:]):
        if a0 >= target > a1:
            return r0 + (r1 - r0) * (a0 - target) / (a0 - a1)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-prompts", type=int, default=40, help="requests a rate, simulated and sent alike")
    ap.add_argument("--rates", default="0.5,0.75,1.0,1.25,1.5,2.0")
    ap.add_argument("--ttft-slo", type=float, default=2.0)
    ap.add_argument("--tpot-slo", type=float, default=0.2)
    ap.add_argument("--max-input-len", type=int, default=512)
    ap.add_argument("--max-output-len", type=int, default=128)
    ap.add_argument("--out-dir", default=str(ROOT / "bench-results" / "planner_check"))
    ap.add_argument("--reuse-runs", action="store_true",
                    help="compare a new plan against the served runs already in --out-dir (profile again, serve nothing)")
    ap.add_argument("--reuse-plan", action="store_true", help="take the plan already in --out-dir (profile nothing)")
    ap.add_argument("--only", default=None, help="serve only the placements whose name contains this")
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = ["--workload", "chat", "--max-input-len", str(args.max_input_len), "--max-output-len",
             str(args.max_output_len)]
    plan_json = out / "plan.json"
    if not args.reuse_plan:
        subprocess.run([sys.executable, "-m", "llmserve.cli", "plan", *shape, "--budgets", "512",
                        "--num-requests", str(args.num_prompts), "--ttft-slo", str(args.ttft_slo),
                        "--tpot-slo", str(args.tpot_slo), "--cores", "2", "--output-json", str(plan_json)],
                       check=True, env={**os.environ, "LLMSERVE_NUM_THREADS": "2"})
    plan = json.loads(plan_json.read_text())
    predicted = {row["placement"]: row["goodput"] for row in plan["ranked"]}
    models = {int(t): StepTimeModel(**m) for t, m in plan["models"].items()}
    lengths = sample_lengths("chat", args.num_prompts, seed=0, max_input_len=args.max_input_len,
                             max_output_len=args.max_output_len)
    rows = {}
    for name, (placement, flags) in PLACEMENTS.items():
        if args.only and args.only not in name:
            continue
        want = predicted[name]
        tag = name.split(",")[0].replace(" ", "_").replace("+", "and")
        result = out / f"{tag}.json"
        if args.reuse_runs:
            served = json.loads(result.read_text())
        else:
            rates = [round(want * float(m), 4) for m in args.rates.split(",")]
            served = serve_and_sweep(flags, rates, shape, args, out / f"{tag}.log", result)
        measured = served.get("goodput_rate") or 0.0
        above = [run["request_rate"] for run in served["runs"] if run["request_rate"] > measured]
        per_rate = [compare(placement, models[placement.threads], plan["transfer_s_per_token"], lengths, run, args)
                    for run in served["runs"]]
        measured_x = crossing([(r["rate"], r["measured_attainment"]) for r in per_rate], 0.9)
        simulated_x = crossing([(r["rate"], r["simulated_attainment"]) for r in per_rate], 0.9)
        print(f"{name:46} predicted {want:.3f} req/s; measured: the highest swept rate meeting 90% {measured:.3f} "
              f"(the next swept: {min(above) if above else 'none'}), 90% crossed at {_fmt(measured_x)} "
              f"(simulated at the same rates: {_fmt(simulated_x)}); measured / predicted "
              f"{measured_x / want if measured_x and want else float('nan'):.2f}", flush=True)
        for r in per_rate:
            print(f"  rate {r['rate']:.3f}: attainment simulated {r['simulated_attainment']:.2f} measured "
                  f"{r['measured_attainment']:.2f}; TTFT p50 {r['simulated_ttft_p50_s']:.2f} / "
                  f"{r['measured_ttft_p50_s']:.2f} s; TPOT p50 {r['simulated_tpot_p50_s'] * 1e3:.0f} / "
                  f"{r['measured_tpot_p50_s'] * 1e3:.0f} ms", flush=True)
        rows[name] = {"predicted": want, "measured": measured, "next_rate_swept": min(above) if above else None,
                      "measured_crossing": measured_x, "simulated_crossing": simulated_x, "per_rate": per_rate}
    (out / "summary.json").write_text(json.dumps(rows, indent=2))


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    main()
