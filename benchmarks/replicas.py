"""One engine against replicas on the same cores, through the same client, in one run.

    .venv/bin/python benchmarks/replicas.py [--num-prompts 48] [--threads 2]

Starts `llmserve serve` three times on the embedded model, one after the other: one engine with all
the threads, `--replicas 2` (half the threads each), and `--prefill-replicas 1 --decode-replicas 1`;
each time `llmserve bench serve` sends the same chat workload (all at once) and reports request
throughput, TTFT and TPOT; then a prefill-heavy mix (--mix-prompts random prompts of --mix-input-len
tokens arriving at --mix-rate per second, each decoding --mix-output-len tokens, so long prompts
land while others decode): p99 TPOT colocated against disaggregated (DistServe's interference
claim), and the KV moves the server counted in /metrics (transfers, their seconds: the downtime of
a move). Results: bench-results/replicas/.
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


def serve(flags: list[str], port: int, threads: int, log: Path, max_model_len: int = 4096) -> subprocess.Popen:
    """`llmserve serve` on the embedded model in its own session, once it answers /ready."""
    env = {**os.environ, "LLMSERVE_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "llmserve.cli", "serve", "--port", str(port),
                             "--max-model-len", str(max_model_len), *flags], stdout=open(log, "w"), stderr=subprocess.STDOUT,
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
    ap.add_argument("--mix-prompts", type=int, default=12)
    ap.add_argument("--mix-input-len", type=int, default=1024)
    ap.add_argument("--mix-output-len", type=int, default=96)
    ap.add_argument("--mix-rate", type=float, default=0.5)
    ap.add_argument("--out-dir", default=str(ROOT / "bench-results" / "replicas"))
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, mix = {}, {}
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
            mixed = out / f"{tag}_mix.json"
            subprocess.run([sys.executable, "-m", "llmserve.cli", "bench", "serve", "--base-url",
                            f"http://127.0.0.1:{port}", "--workload", "random", "--input-len", str(args.mix_input_len),
                            "--output-len", str(args.mix_output_len), "--num-prompts", str(args.mix_prompts),
                            "--request-rate", str(args.mix_rate), "--workload-seed", "1", "--temperature", "0",
                            "--ignore-eos", "--disable-tqdm", "--no-plot", "--request-timeout", "900", "--output-json",
                            str(mixed)], check=True, stdout=subprocess.DEVNULL)
            mix[name] = json.loads(mixed.read_text())["runs"][0]["metrics"]
            mix[name].update(transfer_metrics(port))
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
    print(f"\nprefill-heavy mix: {args.mix_prompts} x {args.mix_input_len} -> {args.mix_output_len} at "
          f"{args.mix_rate} req/s")
    print(f"{'':22}{'done':>6}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}{'TPOT p99':>10}   (ms)"
          f"{'moves':>7}{'s/move':>8}")
    for name, r in mix.items():
        per = r["kv_transfer_seconds"] / r["kv_transfers"] if r["kv_transfers"] else 0.0
        print(f"{name:22}{r['completed']:6d}{r['median_ttft_ms']:10.0f}{r['p99_ttft_ms']:10.0f}"
              f"{r['median_tpot_ms']:10.1f}{r['p99_tpot_ms']:10.1f}        {int(r['kv_transfers']):7d}{per:8.3f}")
    (out / "summary.json").write_text(json.dumps({"chat": rows, "mix": mix}, indent=2))


def transfer_metrics(port: int) -> dict[str, float]:
    """The server's KV-move counters (zero on one engine)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    found = {"kv_transfers": 0.0, "kv_transfer_seconds": 0.0, "kv_transfer_bytes": 0.0}
    for line in text.splitlines():
        for key in found:
            if line.startswith(f"llmserve:{key}_total{{") or line.startswith(f"llmserve:{key}{{"):
                found[key] = float(line.rsplit(" ", 1)[1])
    return found


if __name__ == "__main__":
    main()
