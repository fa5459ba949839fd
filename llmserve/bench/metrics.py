"""Serving metrics, with the definitions `vllm bench serve` uses.

Per request, on the client's clock:
  - TTFT: from sending the request to receiving the first streamed token chunk;
  - ITL: the gaps between consecutive streamed token chunks;
  - E2E latency: from sending the request to its last token chunk;
  - TPOT: (E2E - TTFT) / (output tokens - 1), for requests with more than one output token.
Over a run: request / output-token / total-token throughput over the run's wall time, TTFT/TPOT/
ITL/E2E mean, median, std and percentiles (ITL pooled over all requests' gaps; TPOT over requests
with more than one output token), and for SLOs, request goodput (requests/s that met every SLO;
a request with one output token counts as TPOT 0) and SLO attainment (the fraction of all
requests sent, failed ones included, that completed and met every SLO).

Across a sweep of request rates, goodput in the DistServe sense is the highest rate whose SLO
attainment reaches a target (90% by default).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

SLO_METRICS = ("ttft", "tpot", "e2el")
_SLO_ALIASES = {"ttft": "ttft", "tpot": "tpot", "e2e": "e2el", "e2el": "e2el"}
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)


@dataclass
class RequestResult:
    """What the client saw of one request. Times in seconds."""
    success: bool = False
    prompt_len: int = 0  # the server's usage.prompt_tokens when given, else the workload's count
    output_tokens: int = 0  # the server's usage.completion_tokens when given, else token chunks
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0  # E2E: send to last token chunk
    start_time: float = 0.0  # perf_counter at send
    num_chunks: int = 0  # streamed chunks counted for timing
    bare_finish_chunks: int = 0  # of those, closing chunks with no text after the first
    usage_reported: bool = False
    error: str = ""

    @property
    def tpot(self) -> float | None:
        if self.output_tokens > 1:
            return (self.latency - self.ttft) / (self.output_tokens - 1)
        return None


def parse_goodput(items: Iterable[str] | None) -> dict[str, float]:
    """["ttft:200", "tpot:100"] -> {"ttft": 200.0, "tpot": 100.0} (milliseconds). `e2e` = `e2el`."""
    slos: dict[str, float] = {}
    for item in items or []:
        for part in item.replace(",", " ").split():
            name, sep, value = part.partition(":")
            key = _SLO_ALIASES.get(name.strip().lower())
            if not sep or key is None:
                raise ValueError(f"bad SLO {part!r}: use NAME:MS with NAME one of ttft, tpot, e2e")
            try:
                ms = float(value)
            except ValueError:
                raise ValueError(f"bad SLO {part!r}: {value!r} is not a number of milliseconds") from None
            if not ms > 0:
                raise ValueError(f"bad SLO {part!r}: must be positive")
            slos[key] = ms
    return slos


def parse_percentiles(text: str | Sequence[float] | None) -> list[float]:
    if text is None:
        return list(DEFAULT_PERCENTILES)
    values = [float(x) for x in text.split(",") if x.strip()] if isinstance(text, str) else [float(x) for x in text]
    if not values or any(not 0 < v <= 100 for v in values):
        raise ValueError("percentiles must be in (0, 100]")
    return values


def meets_slos(r: RequestResult, slos: dict[str, float]) -> bool:
    if not r.success:
        return False
    values = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}
    return all(values[k] * 1000.0 <= ms for k, ms in slos.items())


def _pct_key(p: float) -> str:
    return f"p{p:g}".replace(".", "_")


def _stats(prefix: str, values_s: list[float], percentiles: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0 if values_s else np.zeros(1)
    out = {f"mean_{prefix}_ms": float(ms.mean()), f"median_{prefix}_ms": float(np.median(ms)),
           f"std_{prefix}_ms": float(ms.std())}
    for p in percentiles:
        out[f"{_pct_key(p)}_{prefix}_ms"] = float(np.percentile(ms, p))
    return out


def peak_concurrency(results: Sequence[RequestResult]) -> int:
    """Most requests in flight at once, over [send, last token) intervals."""
    events = sorted([(r.start_time, 1) for r in results if r.success]
                    + [(r.start_time + r.latency, -1) for r in results if r.success])
    peak = cur = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak


def compute_metrics(results: Sequence[RequestResult], duration_s: float,
                    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                    slos: dict[str, float] | None = None) -> dict[str, float]:
    """The run's summary: counts, throughputs, latency statistics (ms) and, with SLOs, goodput."""
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    dur = max(duration_s, 1e-9)
    m: dict[str, float] = {
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / dur,
        "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
        "max_concurrency_observed": peak_concurrency(results),
        "usage_reported_fraction": (sum(r.usage_reported for r in ok) / len(ok)) if ok else 0.0,
    }
    m.update(_stats("ttft", [r.ttft for r in ok], percentiles))
    m.update(_stats("tpot", [r.tpot for r in ok if r.tpot is not None], percentiles))
    m.update(_stats("itl", [x for r in ok for x in r.itl], percentiles))
    m.update(_stats("e2el", [r.latency for r in ok], percentiles))
    if slos:
        good = sum(meets_slos(r, slos) for r in ok)
        m["good_requests"] = good
        m["request_goodput"] = good / dur
        m["slo_attainment"] = good / len(results) if results else 0.0
    return m


def goodput_rate(runs: Sequence[dict], target: float = 0.9) -> float | None:
    """The highest request rate among `runs` ({"request_rate": r, "metrics": {...}}) whose SLO
    attainment is at least `target`; None if none reaches it or no SLOs were given."""
    best = None
    for run in runs:
        att = run["metrics"].get("slo_attainment")
        if att is not None and att >= target:
            rate = run["request_rate"]
            if best is None or rate > best:
                best = rate
    return best


def result_rows(results: Sequence[RequestResult]) -> list[dict]:
    """Per-request records for the JSON (no content: lengths and timings only), times in ms."""
    rows = []
    for r in results:
        d = asdict(r)
        d.pop("itl")
        d["ttft_ms"] = d.pop("ttft") * 1000.0
        d["e2el_ms"] = d.pop("latency") * 1000.0
        d["tpot_ms"] = None if r.tpot is None else r.tpot * 1000.0
        d["itl_ms"] = [x * 1000.0 for x in r.itl]
        d.pop("start_time")
        rows.append(d)
    return rows


def fmt_rate(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"
