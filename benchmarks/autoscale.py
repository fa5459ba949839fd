"""A load step against three deployments of the embedded model (issue 17): a fixed minimum
(1 replica), a fixed maximum (2 replicas) and `--autoscale 1:2`, every replica with the same
threads (the cores / the maximum), SLOs TTFT 1.5 s and TPOT 150 ms. The load is Poisson arrivals of
the chat workload's shapes (prompts capped at 256 tokens, outputs at 128): a base rate, then four
times that, then the base rate again. Reported: TTFT p50/p99 over all requests and
over the step, TPOT p50/p99, and replica-seconds (the `llmserve:replicas_serving` gauge, read every
second, integrated over the run).

Usage: python benchmarks/autoscale.py [--base-rate 0.25] [--phases 30,60,90] [--cores 2]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from replicas import free_port, serve  # noqa: E402 - the same server start as the replicas benchmark

ROOT = Path(__file__).resolve().parents[1]
SLO = ["--ttft-slo", "1.5", "--tpot-slo", "0.15"]
VOCAB = 49152  # the embedded model's (SmolLM2)


def schedule(base: float, phases: list[float], seed: int) -> list[tuple[float, int, int, bool]]:
    """(send time, prompt tokens, output tokens, in the step) for Poisson arrivals at base, 4 x base, base."""
    from llmserve.bench.workloads import sample_lengths

    g = np.random.default_rng(seed)
    out, t0 = [], 0.0
    for k, (length, rate) in enumerate(zip(phases, [base, 4 * base, base])):
        t = t0
        while True:
            t += g.exponential(1 / rate)
            if t >= t0 + length:
                break
            out.append((t, k == 1))
        t0 += length
    lengths = sample_lengths("chat", len(out), seed=seed, max_input_len=256, max_output_len=128)
    return [(t, p, o, step) for (t, step), (p, o) in zip(out, lengths)]


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int],
              max_tokens: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    first, n = None, 0
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                if first is None:
                    first = time.perf_counter()
                n += 1
    end = time.perf_counter()
    return first - start, (end - first) / max(n - 1, 1), n


async def drive(url: str, model: str, plan, seed: int) -> tuple[list[dict], float]:
    g = np.random.default_rng(seed + 1)
    replica_seconds = 0.0
    done = asyncio.Event()

    async def watch(client: httpx.AsyncClient):
        nonlocal replica_seconds
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(1.0)
            text = (await client.get(f"{url}/metrics")).text
            serving = next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                            if line.startswith("llmserve:replicas_serving{")), 1.0)
            now = time.perf_counter()
            replica_seconds += serving * (now - last)
            last = now

    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0)) as client:
        watcher = asyncio.create_task(watch(client))
        start = time.perf_counter()

        async def send(at: float, p: int, o: int, step: bool):
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
            ttft, tpot, n = await one(client, url, model, g.integers(100, VOCAB - 100, p).tolist(), o)
            return {"ttft": ttft, "tpot": tpot, "tokens": n, "step": step}

        results = await asyncio.gather(*(send(*req) for req in plan))
        done.set()
        await watcher
    return list(results), replica_seconds


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-rate", type=float, default=0.25)
    ap.add_argument("--phases", default="30,60,90", help="seconds at base, 4 x base, base")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=str(ROOT / "bench-results" / "autoscale"))
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per = max(1, args.cores // 2)
    configs = {"fixed 1 replica": (["--replicas", "1"], per), "fixed 2 replicas": (["--replicas", "2"], args.cores),
               "autoscale 1:2": (["--autoscale", "1:2", *SLO], args.cores)}
    plan = schedule(args.base_rate, [float(x) for x in args.phases.split(",")], args.seed)
    print(f"{len(plan)} requests ({sum(s for *_, s in plan)} in the step), base {args.base_rate} req/s, "
          f"phases {args.phases} s, {per} thread(s) a replica")
    summary = {}
    for name, (flags, threads) in configs.items():
        port = free_port()
        proc = serve(flags, port, threads, out / f"{name.replace(' ', '_').replace(':', '-')}.log", max_model_len=2048)
        try:
            model = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"][0]["id"]
            results, replica_s = asyncio.run(drive(f"http://127.0.0.1:{port}", model, plan, args.seed))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=120)
        ttft = [r["ttft"] for r in results]
        step_ttft = [r["ttft"] for r in results if r["step"]]
        tpot = [r["tpot"] for r in results if r["tokens"] > 1]
        summary[name] = {"ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "step_ttft_p99": pct(step_ttft, 99),
                         "tpot_p50": pct(tpot, 50), "tpot_p99": pct(tpot, 99), "replica_seconds": replica_s,
                         "completed": len(results)}
    print(f"{'':18}{'TTFT p50':>10}{'TTFT p99':>10}{'step p99':>10}{'TPOT p50':>10}{'TPOT p99':>10}{'replica-s':>11}")
    for name, s in summary.items():
        print(f"{name:18}{s['ttft_p50']:10.2f}{s['ttft_p99']:10.2f}{s['step_ttft_p99']:10.2f}"
              f"{s['tpot_p50'] * 1e3:10.0f}{s['tpot_p99'] * 1e3:10.0f}{s['replica_seconds']:11.0f}   (s, s, s, ms, ms)")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
