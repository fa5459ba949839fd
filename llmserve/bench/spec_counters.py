"""Speculative decoding's acceptance as a benchmark sees it: from the engine's counters, in process
(`llmserve bench throughput`) or scraped from a server's Prometheus /metrics (`llmserve bench
serve`; vLLM's counter names with the llmserve: prefix, or vllm:). Counts only."""
from __future__ import annotations

import httpx

COUNTERS = ("spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens")


def spec_decode_summary(before: dict, after: dict) -> dict:
    """The counters' growth over a run, its acceptance rate and tokens per verify run (accepted + 1);
    empty when nothing was verified."""
    drafts, tokens, accepted = (after.get(k, 0) - before.get(k, 0) for k in COUNTERS)
    if not drafts:
        return {}
    return {"spec_decode_num_drafts": drafts, "spec_decode_num_draft_tokens": tokens,
            "spec_decode_num_accepted_tokens": accepted,
            "spec_decode_acceptance_rate": accepted / tokens if tokens else 0.0,
            "spec_decode_mean_tokens_per_verify": 1 + accepted / drafts}


def parse_counters(text: str) -> dict:
    """The counters' values (summed over labels) in a Prometheus text exposition."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")  # name{labels} value
        base = sample.split("{", 1)[0].split(":", 1)[-1].removesuffix("_total")
        if base in COUNTERS:
            try:
                values[base] = values.get(base, 0.0) + float(value)
            except ValueError:
                continue
    return values


def scrape(base_url: str, headers: dict | None = None) -> dict:
    """The server's counters now; empty when it has no /metrics or no such counters."""
    try:
        r = httpx.get(base_url.rstrip("/") + "/metrics", headers=headers or {}, timeout=10.0)
    except httpx.HTTPError:
        return {}
    return parse_counters(r.text) if r.status_code == 200 else {}
