"""The goodput planner's predictions against measured `llmserve bench serve` runs (issue 17).

`llmserve plan` profiles the engine at each thread count and predicts each placement's goodput
(the highest Poisson rate at which >= 90% of requests meet both SLOs). Three placements of the
cores are then served for real: 1 replica with all threads, 2 replicas with half each, and 1 prefill
+ 1 decode replica; each is swept at rates around its predicted goodput with the same workload
shapes, and its measured goodput is the highest swept rate whose attainment is >= 90%.

Usage: python benchmarks/planner_check.py [--num-prompts 20] [--rates 0.6,0.8,1.0,1.25]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from replicas import free_port, serve  # noqa: E402 - the same server start as the replicas benchmark

ROOT = Path(__file__).resolve().parents[1]
PLACEMENTS = {"1 replica x 2 threads, budget 512": [],
              "2 replicas x 1 thread, budget 512": ["--replicas", "2"],
              "1 prefill + 1 decode x 1 thread, budget 512": ["--prefill-replicas", "1", "--decode-replicas", "1"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-prompts", type=int, default=20, help="at most this many a rate (fewer at low rates: "
                                                                 "about a minute of arrivals, at least 8)")
    ap.add_argument("--rates", default="0.6,0.8,1.0,1.25")
    ap.add_argument("--ttft-slo", type=float, default=2.0)
    ap.add_argument("--tpot-slo", type=float, default=0.2)
    ap.add_argument("--max-input-len", type=int, default=512)
    ap.add_argument("--max-output-len", type=int, default=128)
    ap.add_argument("--out-dir", default=str(ROOT / "bench-results" / "planner_check"))
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = ["--workload", "chat", "--max-input-len", str(args.max_input_len), "--max-output-len",
             str(args.max_output_len)]
    plan_json = out / "plan.json"
    subprocess.run([sys.executable, "-m", "llmserve.cli", "plan", *shape[:2], "--max-input-len",
                    str(args.max_input_len), "--max-output-len", str(args.max_output_len), "--budgets", "512",
                    "--ttft-slo", str(args.ttft_slo), "--tpot-slo", str(args.tpot_slo), "--cores", "2",
                    "--output-json", str(plan_json)], check=True, env={**os.environ, "LLMSERVE_NUM_THREADS": "2"})
    predicted = {row["placement"]: row["goodput"] for row in json.loads(plan_json.read_text())["ranked"]}
    rows = {}
    for name, flags in PLACEMENTS.items():
        want = predicted[name]
        rates = [round(want * float(m), 4) for m in args.rates.split(",")]
        port = free_port()
        tag = name.split(",")[0].replace(" ", "_").replace("+", "and")
        proc = serve(flags, port, 2, out / f"{tag}.log")
        try:
            result = out / f"{tag}.json"
            subprocess.run([sys.executable, "-m", "llmserve.cli", "bench", "serve", "--base-url",
                            f"http://127.0.0.1:{port}", *shape, "--num-prompts",
                            str(max(8, min(args.num_prompts, round(want * 60)))),
                            "--request-rate", ",".join(map(str, rates)), "--workload-seed", "0", "--temperature", "0",
                            "--ignore-eos", "--goodput", f"ttft:{args.ttft_slo * 1e3:g}", f"tpot:{args.tpot_slo * 1e3:g}",
                            "--disable-tqdm", "--no-plot", "--request-timeout", "900", "--output-json", str(result)],
                           check=True, stdout=subprocess.DEVNULL)
            measured = json.loads(result.read_text()).get("goodput_rate") or 0.0
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=120)
        rows[name] = {"predicted": want, "measured": measured, "rates": rates}
        print(f"{name:46} predicted {want:.3f} req/s, measured {measured:.3f} req/s "
              f"({measured / want if want else float('nan'):.2f}x), rates tried {rates}", flush=True)
    (out / "summary.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
