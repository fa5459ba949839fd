"""`llmserve bench serve`: load an OpenAI-compatible server with timed arrivals and measure it."""
from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
from tqdm.auto import tqdm

from llmserve.bench.client import ClientConfig, send_request
from llmserve.bench.metrics import (
    RequestResult,
    compute_metrics,
    fmt_rate,
    goodput_rate,
    result_rows,
)
from llmserve.bench.spec_counters import scrape, spec_decode_summary
from llmserve.bench.workloads import BenchRequest, arrival_offsets


def parse_rates(text: str | float | Sequence[float]) -> list[float]:
    """"1,2,4" -> [1.0, 2.0, 4.0]; "inf" means every request at once."""
    if isinstance(text, (int, float)):
        values = [float(text)]
    elif isinstance(text, str):
        values = [float(x) for x in text.split(",") if x.strip()]
    else:
        values = [float(x) for x in text]
    if not values or any(not v > 0 for v in values):
        raise ValueError("request rates must be positive numbers or inf")
    return values


@dataclass
class RunSpec:
    rate: float
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0
    request_timeout_s: float = 600.0
    progress: bool = True


async def run_load(cfg: ClientConfig, reqs: Sequence[BenchRequest], spec: RunSpec) -> tuple[list[RequestResult], float]:
    """Send `reqs` at the spec's arrival times (and concurrency cap); returns results in order and the
    run's wall time, from the first send to the last response."""
    offsets = arrival_offsets(len(reqs), spec.rate, spec.burstiness, np.random.default_rng(spec.seed))
    conns = spec.max_concurrency or max(1, len(reqs))
    limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)
    timeout = httpx.Timeout(connect=30.0, read=spec.request_timeout_s, write=30.0, pool=None)
    sem = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None
    bar = tqdm(total=len(reqs), desc=f"rate {fmt_rate(spec.rate)}", disable=not spec.progress, dynamic_ncols=True)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        start = time.perf_counter()

        async def one(i: int, req: BenchRequest) -> RequestResult:
            delay = start + offsets[i] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if sem is None:
                res = await send_request(client, cfg, req)
            else:
                async with sem:
                    res = await send_request(client, cfg, req)
            bar.update(1)
            return res

        results = await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)))
        duration = time.perf_counter() - start
    bar.close()
    for r in results:
        r.start_time -= start  # relative to the run's start from here on
    return list(results), duration


# ---- server discovery ------------------------------------------------------------------------
def wait_for_server(base_url: str, timeout_s: float) -> None:
    """Poll GET /v1/models until it answers 200, for at most timeout_s seconds."""
    deadline = time.monotonic() + timeout_s
    url = base_url.rstrip("/") + "/v1/models"
    while True:
        try:
            if httpx.get(url, timeout=5.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"no server answered at {url} within {timeout_s:g} s")
        time.sleep(1.0)


def discover_model(base_url: str, headers: dict | None = None) -> str:
    url = base_url.rstrip("/") + "/v1/models"
    try:
        resp = httpx.get(url, headers=headers or {}, timeout=30.0)
        resp.raise_for_status()
        data = resp.json().get("data") or []
        return str(data[0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
        raise RuntimeError(f"cannot list the models at {url} ({e.__class__.__name__}); "
                           "is the server up? (pass --model to skip the lookup)") from None


# ---- reporting -------------------------------------------------------------------------------
def format_metrics(m: dict, percentiles: Sequence[float], title: str) -> str:
    lines = [f"{' ' + title + ' ':=^60}"]

    def row(label: str, value) -> None:
        lines.append(f"{label:<42}{value:>18}")

    row("Successful requests:", m["completed"])
    row("Failed requests:", m["failed"])
    row("Benchmark duration (s):", f"{m['duration_s']:.2f}")
    row("Total input tokens:", m["total_input_tokens"])
    row("Total generated tokens:", m["total_output_tokens"])
    row("Request throughput (req/s):", f"{m['request_throughput']:.3f}")
    if "request_goodput" in m:
        row("Request goodput (req/s):", f"{m['request_goodput']:.3f}")
        row("SLO attainment (%):", f"{100 * m['slo_attainment']:.1f}")
    row("Output token throughput (tok/s):", f"{m['output_throughput']:.2f}")
    row("Total token throughput (tok/s):", f"{m['total_token_throughput']:.2f}")
    row("Peak concurrent requests:", m["max_concurrency_observed"])
    if m.get("spec_decode_num_drafts"):
        row("Spec decode acceptance rate (%):", f"{100 * m['spec_decode_acceptance_rate']:.1f}")
        row("Spec decode tokens per verify step:", f"{m['spec_decode_mean_tokens_per_verify']:.2f}")
    names = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
             "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for key, name in names.items():
        lines.append(f"{name:-^60}")
        row(f"Mean {key.upper()} (ms):", f"{m[f'mean_{key}_ms']:.2f}")
        row(f"Median {key.upper()} (ms):", f"{m[f'median_{key}_ms']:.2f}")
        for p in percentiles:
            tag = f"p{p:g}".replace(".", "_")
            row(f"P{p:g} {key.upper()} (ms):", f"{m[f'{tag}_{key}_ms']:.2f}")
    lines.append("=" * 60)
    return "\n".join(lines)


def run_sweep(cfg: ClientConfig, reqs_per_rate: Sequence[Sequence[BenchRequest]], rates: Sequence[float], *,
              burstiness: float = 1.0,
              max_concurrency: int | None = None, seed: int = 0, percentiles: Sequence[float] = (50, 90, 99),
              slos: dict[str, float] | None = None, slo_target: float = 0.9, request_timeout_s: float = 600.0,
              progress: bool = True, echo=print) -> dict:
    """Run the workload once per rate (reqs_per_rate[i] at rates[i]: the same lengths with fresh
    prompts, so no rate reads the prefix cache an earlier one filled); the JSON-ready result."""
    if len(reqs_per_rate) != len(rates):
        raise ValueError("one request list per rate")
    runs = []
    for rate, reqs in zip(rates, reqs_per_rate):
        spec = RunSpec(rate, burstiness, max_concurrency, seed, request_timeout_s, progress)
        before = scrape(cfg.base_url, cfg.headers)
        results, duration = asyncio.run(run_load(cfg, reqs, spec))
        metrics = compute_metrics(results, duration, percentiles, slos)
        if before:  # a server that counts speculative decoding: its acceptance over this run
            metrics.update(spec_decode_summary(before, scrape(cfg.base_url, cfg.headers)))
        failed = [r.error for r in results if not r.success]
        if failed:
            echo(f"{len(failed)} request(s) failed at rate {fmt_rate(rate)}; first error: {failed[0]}")
        echo(format_metrics(metrics, percentiles, f"rate {fmt_rate(rate)} req/s"))
        rows = result_rows(results)
        for row, res in zip(rows, results):
            row["send_time_s"] = res.start_time
        runs.append({"request_rate": rate, "metrics": metrics, "requests": rows})
    out = {"runs": runs}
    if slos:
        out["goodput_rate"] = goodput_rate(runs, slo_target)
        out["slo_target"] = slo_target
    return out


def json_safe(obj):
    """inf is not JSON: write it as the string "inf"."""
    if isinstance(obj, float) and math.isinf(obj):
        return "inf" if obj > 0 else "-inf"
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def default_result_paths(result_dir: str | Path, stem: str = "serve") -> tuple[Path, Path]:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    d = Path(result_dir)
    return d / f"{stem}-{stamp}.json", d / f"{stem}-{stamp}.png"


def write_json(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(data), indent=1))
