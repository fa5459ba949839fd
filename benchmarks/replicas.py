"""One engine against replicas on the same cores, through the same client, in one run.

    .venv/bin/python benchmarks/replicas.py [--num-prompts 48] [--threads 2]

Starts `llmserve serve` three times on the embedded model, one after the other: one engine with all
the threads, `--replicas 2` (half the threads each), and `--prefill-replicas 1 --decode-replicas 1`;
each time `llmserve bench serve` sends the same chat workload (all at once) and reports request
throughput, TTFT and TPOT. Results: bench-results/replicas/.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"1 engine": [], "2 replicas": ["--replicas", "2"],
           "1 prefill + 1 decode": ["--prefill-replicas", "1", "--decode-replicas", "1"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(flags: list[str], port: int, threads: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "LLMSERVE_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "llmserve.cli", "serve", "--port", str(port),
                             "--max-model-len", "2048", *flags], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited; see {log}")
        time.sleep(0.5)
    raise RuntimeError(f"server did not become ready; see {log}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default=str(ROOT / "bench-results" / "replicas"))
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, flags in CONFIGS.items():
        tag = name.replace(" ", "_").replace("+", "and")
        port = free_port()
        proc = serve(flags, port, args.threads, out / f"{tag}.log")
        try:
            result = out / f"{tag}.json"
            subprocess.run([sys.executable, "-m", "llmserve.cli", "bench", "serve", "--base-url",
                            f"http://127.0.0.1:{port}", "--endpoint", "/v1/chat/completions", "--workload", "chat",
                            "--num-prompts", str(args.num_prompts), "--workload-seed", "0", "--temperature", "0",
                            "--disable-tqdm", "--no-plot", "--request-timeout", "900", "--output-json", str(result)], check=True,
                           stdout=subprocess.DEVNULL)
            rows[name] = json.loads(result.read_text())["runs"][0]["metrics"]
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=120)
    print(f"{'':22}{'done':>6}{'req/s':>8}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}{'TPOT p99':>10}   (ms)")
    for name, r in rows.items():
        print(f"{name:22}{r['completed']:6d}{r['request_throughput']:8.3f}{r['median_ttft_ms']:10.0f}{r['p99_ttft_ms']:10.0f}"
              f"{r['median_tpot_ms']:10.1f}{r['p99_tpot_ms']:10.1f}")
    base = rows["1 engine"]["request_throughput"]
    for name, r in rows.items():
        print(f"{name}: {r['request_throughput'] / base:.2f}x the request throughput of one engine")


if __name__ == "__main__":
    main()
