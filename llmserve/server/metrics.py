"""Prometheus metrics with vLLM-style names under `llmserve:`. Labels carry the model name and
finish reasons only, never content. Each app has its own registry, so two servers in one process
(tests) do not share counters."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llmserve.engine.async_engine import AsyncLLMEngine

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)


@dataclass(frozen=True)
class FinishedRequest:
    """What is recorded about a request once it ends: counts and timings, no content."""
    request_id: str
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    finish_reasons: tuple[str, ...]  # one per completion (n of them)
    queue_s: float | None
    ttft_s: float | None
    e2e_s: float
    draft_tokens: int = 0  # speculative decoding: draft tokens verified for this request
    accepted_tokens: int = 0  # and accepted


class _EngineCollector(Collector):
    """Gauges and counters read from the engine's latest stats snapshot at scrape time."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats()
        for name, doc, value in (
                ("llmserve:num_requests_running", "Sequences being computed this step.", s.num_running),
                ("llmserve:num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting),
                ("llmserve:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).", s.kv_usage),
                ("llmserve:kv_offload_bytes_stored", "Bytes of KV held by the disk tier.", s.kv_offload_bytes_stored)):
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric([self.model_name], value)
            yield gauge
        for name, doc, value in (
                ("llmserve:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                 s.prefix_cache_queries),
                ("llmserve:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits),
                ("llmserve:spec_decode_num_drafts", "Speculative decoding: verify runs (a request's drafts "
                 "verified in one step).", s.spec_decode_num_drafts),
                ("llmserve:spec_decode_num_draft_tokens", "Speculative decoding: draft tokens verified.",
                 s.spec_decode_num_draft_tokens),
                ("llmserve:spec_decode_num_accepted_tokens", "Speculative decoding: draft tokens accepted.",
                 s.spec_decode_num_accepted_tokens),
                ("llmserve:prefix_cache_disk_hits", "Prompt tokens read back from the KV disk tier.",
                 s.prefix_cache_disk_hits),
                ("llmserve:kv_offload_bytes_written", "Bytes of KV written to the disk tier.",
                 s.kv_offload_bytes_written),
                ("llmserve:kv_offload_bytes_read", "Bytes of KV read back from the disk tier.",
                 s.kv_offload_bytes_read)):
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            counter.add_metric([self.model_name], value)
            yield counter
        if s.replicas:  # per replica, labelled by its index (never by anything of a request)
            serving = GaugeMetricFamily("llmserve:replicas_serving", "Replicas taking requests.", labels=["model_name"])
            serving.add_metric([self.model_name], sum(r[3] for r in s.replicas))
            yield serving
            for k, (name, doc) in enumerate((
                    ("llmserve:replica_num_requests_running", "Sequences being computed, per replica."),
                    ("llmserve:replica_num_requests_waiting", "Sequences waiting, per replica."),
                    ("llmserve:replica_kv_cache_usage_perc", "Fraction of KV blocks in use, per replica."))):
                gauge = GaugeMetricFamily(name, doc, labels=["model_name", "replica"])
                for i, r in enumerate(s.replicas):
                    gauge.add_metric([self.model_name, str(i)], r[k])
                yield gauge
            for name, doc, value in (
                    ("llmserve:kv_transfers", "Requests moved with their KV between replicas.", s.kv_transfers),
                    ("llmserve:kv_transfer_seconds", "Time those moves took (migration downtime).",
                     s.kv_transfer_seconds),
                    ("llmserve:kv_transfer_bytes", "KV bytes those moves carried.", s.kv_transfer_bytes),
                    ("llmserve:replica_restarts", "Replicas that died and were restarted.", s.replica_restarts),
                    ("llmserve:autoscale_scale_outs", "Replicas the autoscaler added.", s.autoscale_outs),
                    ("llmserve:autoscale_scale_ins", "Replicas the autoscaler drained and stopped.", s.autoscale_ins),
                    ("llmserve:replica_steps", "Replica steps that ran requests.", s.replica_steps),
                    ("llmserve:replica_step_seconds", "Seconds those steps took, scheduling included.",
                     s.replica_step_seconds),
                    ("llmserve:replica_step_cpu_seconds", "CPU seconds the replicas had in those steps (below "
                     "threads x step seconds when other work takes their cores).", s.replica_step_cpu_seconds),
                    ("llmserve:replica_front_wait_seconds", "Seconds replicas with work waited for the front end's "
                     "next call (its share of their time).", s.replica_front_wait_seconds)):
                counter = CounterMetricFamily(name, doc, labels=["model_name"])
                counter.add_metric([self.model_name], value)
                yield counter


class ServerMetrics:
    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        disable_created_metrics()  # the `_created` series only add noise to a scrape
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, labels = self.registry, ["model_name"]
        self.prompt_tokens = Counter("llmserve:prompt_tokens", "Prompt tokens of finished requests.", labels,
                                     registry=r)
        self.generation_tokens = Counter("llmserve:generation_tokens", "Generated tokens, counted as they stream.",
                                         labels, registry=r)
        self.request_success = Counter("llmserve:request_success", "Finished completions by finish reason.",
                                       labels + ["finished_reason"], registry=r)
        self.withdrawn = Counter("llmserve:withdrawn_sequences",
                                 "Sequences admitted, then withdrawn before any output because another prompt "
                                 "of the same request was refused (that request got an error status).", labels,
                                 registry=r)
        self.ttft = Histogram("llmserve:time_to_first_token_seconds", "Arrival to first token.", labels,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("llmserve:inter_token_latency_seconds", "Gap between consecutive output tokens.",
                             labels, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("llmserve:e2e_request_latency_seconds", "Arrival to finish.", labels,
                             buckets=REQUEST_BUCKETS, registry=r)
        self.queue = Histogram("llmserve:request_queue_time_seconds", "Arrival to first scheduled.", labels,
                               buckets=REQUEST_BUCKETS, registry=r)
        r.register(_EngineCollector(engine, model_name))

    def observe_inter_token(self, gap_s: float, num_tokens: int) -> None:
        """num_tokens arrived together after gap_s: each is counted with an even share of the gap."""
        child = self.itl.labels(self.model_name)
        for _ in range(num_tokens):
            child.observe(gap_s / num_tokens)

    def observe_generated(self, num_tokens: int) -> None:
        self.generation_tokens.labels(self.model_name).inc(num_tokens)

    def observe_withdrawn(self, num_sequences: int) -> None:
        self.withdrawn.labels(self.model_name).inc(num_sequences)

    def observe_finished(self, r: FinishedRequest) -> None:
        m = self.model_name
        self.prompt_tokens.labels(m).inc(r.prompt_tokens)
        for reason in r.finish_reasons:
            self.request_success.labels(m, reason).inc()
        if r.ttft_s is not None:
            self.ttft.labels(m).observe(r.ttft_s)
        if r.queue_s is not None:
            self.queue.labels(m).observe(r.queue_s)
        self.e2e.labels(m).observe(r.e2e_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
