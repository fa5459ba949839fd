"""Goodput planner (DistServe): which placement of this engine on these cores serves the most
requests per second within both SLOs.

A step-time model is fitted to steps measured on this machine (profile_steps); a discrete-event
simulation replays a workload (the bench's length shapes, Poisson arrivals) through each candidate
placement exactly as the scheduler builds steps (one token budget: running decodes first, then
prompt chunks first come first served); goodput is the highest arrival rate at which at least
`attainment` of the requests meet both the TTFT and the TPOT SLO, found by bisection. Placements are
ranked by goodput per core.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from llmserve.bench.workloads import arrival_offsets


@dataclass(frozen=True)
class StepTimeModel:
    """Seconds of one engine step: a fixed cost, plus per prompt token computed, per decoding
    sequence, and per context position attended (summed over the step's tokens, prompt chunks' as
    well as decodes': attention's work, which grows with the context where the rest does not)."""
    fixed_s: float
    per_prefill_token_s: float
    per_decode_seq_s: float
    per_context_token_s: float

    def step_s(self, prefill_tokens: int, decode_seqs: int, context_tokens: int) -> float:
        return (self.fixed_s + self.per_prefill_token_s * prefill_tokens + self.per_decode_seq_s * decode_seqs
                + self.per_context_token_s * context_tokens)

    @classmethod
    def fit(cls, samples: list[tuple[int, int, int, float]]) -> StepTimeModel:
        """Least squares over (prefill tokens, decode sequences, context tokens, seconds) samples,
        coefficients kept non-negative (a cost never goes down with more work)."""
        a = np.array([[1.0, p, d, c] for p, d, c, _ in samples])
        y = np.array([s for *_, s in samples])
        keep = [0, 1, 2, 3]
        while True:  # drop the most negative per-unit term and refit, until none is negative
            coef = np.zeros(4)
            coef[keep] = np.linalg.lstsq(a[:, keep], y, rcond=None)[0]
            negative = [j for j in keep if j and coef[j] < 0]
            if not negative:
                return cls(*(max(float(c), 0.0) for c in coef))
            keep.remove(min(negative, key=lambda j: coef[j]))


@dataclass(frozen=True)
class Placement:
    """Colocated replicas (prefill_replicas == 0) or a prefill/decode split, `threads` each."""
    replicas: int
    threads: int
    token_budget: int = 512
    prefill_replicas: int = 0

    @property
    def decode_replicas(self) -> int:
        return self.replicas - self.prefill_replicas if self.prefill_replicas else 0

    @property
    def cores(self) -> int:
        return self.replicas * self.threads

    def __str__(self) -> str:
        shape = (f"{self.prefill_replicas} prefill + {self.decode_replicas} decode" if self.prefill_replicas
                 else f"{self.replicas} replica{'s' if self.replicas > 1 else ''}")
        return f"{shape} x {self.threads} thread{'s' if self.threads > 1 else ''}, budget {self.token_budget}"


@dataclass(frozen=True)
class SimRequest:
    arrival: float
    prompt: int
    output: int


@dataclass
class _Seq:
    req: SimRequest
    index: int
    computed: int = 0  # prompt tokens computed
    generated: int = 0
    first_token: float | None = None


@dataclass
class SimResult:
    ttft: list[float] = field(default_factory=list)  # per request, in request order
    tpot: list[float] = field(default_factory=list)  # per request (0 for one-token outputs)

    def attainment(self, ttft_slo: float, tpot_slo: float) -> float:
        ok = sum(1 for a, b in zip(self.ttft, self.tpot) if a <= ttft_slo and b <= tpot_slo)
        return ok / len(self.ttft) if self.ttft else 1.0


def _run_replica(arrivals: list[tuple[float, _Seq]], model: StepTimeModel, budget: int, prefill_only: bool,
                 on_first: Callable[[_Seq, float], None], on_finish: Callable[[_Seq, float], None]) -> None:
    """One replica's steps over the sequences that reach it (arrival time, sequence), in time order.
    A sequence arriving with its prompt computed (a decode replica's) starts decoding at once."""
    pending = deque(sorted(arrivals, key=lambda a: a[0]))
    waiting: deque[_Seq] = deque()  # prompts not yet fully computed, first come first served
    decoding: list[_Seq] = []
    t = 0.0
    while pending or waiting or decoding:
        if not waiting and not decoding:
            t = max(t, pending[0][0])
        while pending and pending[0][0] <= t:
            seq = pending.popleft()[1]
            (decoding if seq.computed >= seq.req.prompt else waiting).append(seq)
        left = budget - len(decoding)
        chunks = []
        for seq in waiting:
            if left <= 0:
                break
            n = min(seq.req.prompt - seq.computed, left)
            chunks.append((seq, n))
            left -= n
        # Positions attended, as ScheduledRequest.attended counts them: a decode its context and
        # itself, a chunk each token's prefix and itself.
        attended = (sum(s.req.prompt + s.generated for s in decoding)
                    + sum(n * s.computed + n * (n + 1) // 2 for s, n in chunks))
        t += model.step_s(sum(n for _, n in chunks), len(decoding), attended)
        for seq in list(decoding):
            seq.generated += 1
            if seq.generated >= seq.req.output:
                decoding.remove(seq)
                on_finish(seq, t)
        for seq, n in chunks:
            seq.computed += n
            if seq.computed >= seq.req.prompt:
                waiting.remove(seq)
                seq.generated = 1
                seq.first_token = t
                on_first(seq, t)
                if seq.generated >= seq.req.output:
                    on_finish(seq, t)
                elif not prefill_only:
                    decoding.append(seq)


def simulate(placement: Placement, model: StepTimeModel, requests: list[SimRequest],
             transfer_s_per_token: float = 0.0, decode_model: StepTimeModel | None = None) -> SimResult:
    """TTFT and TPOT of every request through `placement`; requests go to replicas in turn (the
    round_robin router). Disaggregated: a prompt's KV moves to a decode replica after its first
    token, taking transfer_s_per_token per prompt token."""
    result = SimResult([0.0] * len(requests), [0.0] * len(requests))
    seqs = [_Seq(r, i) for i, r in enumerate(requests)]

    def first(seq: _Seq, t: float) -> None:
        result.ttft[seq.index] = t - seq.req.arrival

    def finish(seq: _Seq, t: float) -> None:
        if seq.req.output > 1:
            result.tpot[seq.index] = (t - seq.first_token) / (seq.req.output - 1)

    front = placement.prefill_replicas or placement.replicas
    for r in range(front):
        mine = [(s.req.arrival, s) for s in seqs if s.index % front == r]
        _run_replica(mine, model, placement.token_budget, bool(placement.prefill_replicas), first, finish)
    if placement.prefill_replicas:
        moved = [s for s in seqs if s.req.output > 1]
        for r in range(placement.decode_replicas):
            mine = [(s.first_token + transfer_s_per_token * s.req.prompt, s) for s in moved
                    if s.index % placement.decode_replicas == r]
            # Its sequences' first tokens are out already (on_first never fires there).
            _run_replica(mine, decode_model or model, placement.token_budget, False, first, finish)
    return result


def poisson_requests(lengths: list[tuple[int, int]], rate: float, seed: int = 0) -> list[SimRequest]:
    """The lengths arriving as a Poisson process of `rate` per second, drawn exactly as `llmserve
    bench serve --request-rate rate --seed seed` sends them (the first at 0; a higher rate is the
    same sequence of requests, closer together), so a plan can be checked against that run."""
    arrivals = arrival_offsets(len(lengths), rate, 1.0, np.random.default_rng(seed))
    return [SimRequest(a, p, o) for a, (p, o) in zip(arrivals, lengths)]


def goodput(placement: Placement, model: StepTimeModel, lengths: list[tuple[int, int]], ttft_slo: float,
            tpot_slo: float, attainment: float = 0.9, transfer_s_per_token: float = 0.0,
            decode_model: StepTimeModel | None = None, seed: int = 0) -> float:
    """The highest request rate (per second) at which `attainment` of the requests meet both SLOs
    (0 if not even a trickle does), to within 2%."""
    def ok(rate: float) -> bool:
        res = simulate(placement, model, poisson_requests(lengths, rate, seed), transfer_s_per_token, decode_model)
        return res.attainment(ttft_slo, tpot_slo) >= attainment

    lo, hi = 0.0, 1e-3
    if not ok(hi):
        return 0.0
    while ok(hi * 2) and hi < 1e6:
        hi *= 2
    lo, hi = hi, hi * 2
    while hi - lo > 0.02 * lo:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def candidate_placements(cores: int, budgets: tuple[int, ...] = (256, 512)) -> list[Placement]:
    """Every way to split `cores` into equal replicas, colocated or as a prefill/decode split."""
    out = []
    for threads in range(1, cores + 1):
        if cores % threads:
            continue
        n = cores // threads
        for budget in budgets:
            out.append(Placement(n, threads, budget))
            out.extend(Placement(n, threads, budget, prefill_replicas=p) for p in range(1, n))
    return out


def profile_steps(llm, threads: int, repeats: int = 3) -> StepTimeModel:
    """A StepTimeModel fitted to profile_samples of `llm`'s engine with `threads` threads."""
    return StepTimeModel.fit(profile_samples(llm, threads, repeats))


PROFILE_SHAPES = [(64, 1, 1), (256, 1, 1), (512, 1, 1)] + [(ctx, n, 8) for ctx in (64, 448) for n in (1, 8, 32)]
"""(prompt tokens, requests at once, tokens each generates): prompt chunks alone, and decodes of
several batch sizes at two context lengths."""


def _profile_rounds(engine, repeats: int, copies: int = 1):
    """Add each profile shape's requests to `engine` (`copies` times over: one batch a replica) and
    yield after each shape, for the caller to step it to the end; round 0 warms up (kernels,
    allocations). Yields the round's number."""
    from llmserve.sampling_params import SamplingParams

    vocab = engine.model_config.vocab_size
    g = np.random.default_rng(0)
    for rep in range(repeats + 1):
        for prompt, batch, steps in PROFILE_SHAPES:
            params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
            for i in range(batch * copies):
                engine.add_request(f"profile-{rep}-{prompt}-{batch}-{i}", g.integers(0, vocab, prompt).tolist(),
                                   params)
            yield rep


def _medians(by_shape: dict[tuple[int, int, int], list[float]]) -> list[tuple[int, int, int, float]]:
    """Each shape counts once, with its median step time, so one slow step (a compile, another
    process) does not bend the fit."""
    return [(*key, float(np.median(times))) for key, times in by_shape.items()]


def profile_samples(llm, threads: int, repeats: int = 3) -> list[tuple[int, int, int, float]]:
    """(prompt tokens, decodes, positions attended, seconds) of the profile shapes' steps run on
    `llm`'s engine with `threads` threads, each the whole step (scheduling and update too)."""
    import torch

    engine = llm.engine
    torch.set_num_threads(threads)
    by_shape: dict[tuple[int, int, int], list[float]] = {}
    for rep in _profile_rounds(engine, repeats):
        while engine.has_unfinished_requests():
            engine.last_step_shape = None
            start = time.perf_counter()
            engine.step()
            elapsed = time.perf_counter() - start
            if engine.last_step_shape is not None and rep > 0:
                by_shape.setdefault(engine.last_step_shape[:3], []).append(elapsed)
    return _medians(by_shape)


def profile_replicated(engine_kwargs: dict, replicas: int, cores: int, repeats: int = 3) -> StepTimeModel:
    """A StepTimeModel for one of `replicas` replicas sharing `cores` (cores // replicas threads
    each), profiled as they serve: Ray actors driven by this process's front end, every replica
    given each shape at once, so the fit carries what they cost each other (memory bandwidth,
    caches, the front end's share of the cores). The time a replica sits with work waiting on the
    front end between steps (the Ray round trip) is added to the fixed cost of a step."""
    import dataclasses
    import os

    from llmserve.entrypoints.llm import LLM

    before = os.environ.get("LLMSERVE_NUM_THREADS")
    os.environ["LLMSERVE_NUM_THREADS"] = str(cores)  # ReplicatedEngine gives each replica its share of these
    try:
        llm = LLM(**{**engine_kwargs, "replicas": replicas, "router": "round_robin"})
    finally:
        if before is None:
            os.environ.pop("LLMSERVE_NUM_THREADS")
        else:
            os.environ["LLMSERVE_NUM_THREADS"] = before
    engine = llm.engine
    try:
        by_shape: dict[tuple[int, int, int], list[float]] = {}
        waited = steps = 0.0
        for rep in _profile_rounds(engine, repeats, copies=replicas):
            engine.step_log, engine.waited_s, engine.steps_waited = [], 0.0, 0
            while engine.has_unfinished_requests():
                engine.step()
            if rep > 0:
                for _, *shape, seconds in engine.step_log:
                    by_shape.setdefault(tuple(shape), []).append(seconds)
                waited, steps = waited + engine.waited_s, steps + engine.steps_waited
    finally:
        llm.shutdown()
    model = StepTimeModel.fit(_medians(by_shape))
    return dataclasses.replace(model, fixed_s=model.fixed_s + (waited / steps if steps else 0.0))


def rank(placements: list[Placement], models: dict[int, StepTimeModel], lengths: list[tuple[int, int]],
         ttft_slo: float, tpot_slo: float, transfer_s_per_token: float = 0.0) -> list[tuple[Placement, float]]:
    """(placement, goodput) for each placement whose thread count was profiled, best goodput per core first."""
    scored = [(p, goodput(p, models[p.threads], lengths, ttft_slo, tpot_slo, transfer_s_per_token=transfer_s_per_token))
              for p in placements if p.threads in models]
    return sorted(scored, key=lambda x: (-x[1] / x[0].cores, str(x[0])))


def describe(model: StepTimeModel) -> str:
    return (f"{model.fixed_s * 1e3:.2f} ms + {model.per_prefill_token_s * 1e6:.1f} us/prompt token + "
            f"{model.per_decode_seq_s * 1e6:.0f} us/decode + {model.per_context_token_s * 1e9:.1f} ns/context token")

