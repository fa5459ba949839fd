"""SLO-driven replica count: scale out when queued requests are predicted to miss the TTFT SLO or
running ones the TPOT SLO, scale in (with hysteresis) when one replica fewer would still meet both.

Predictions come from a step-time model measured on this engine (seconds per prefill token, and a
decode step's fixed cost plus its cost per running sequence), so the decision is made before the
SLO is missed, not after. Scaling out needs the predictions averaged over the last `out_window_s`
to miss an SLO (one burst is not a trend, and Poisson arrivals drain the queue now and then, so a
breach rarely holds at every tick; ticks with nothing queued or running do not count); scaling in needs calm at every tick for `in_hold_s`. Every
decision carries its reason (counts and timings only), for a log line and a metric.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class AutoscaleConfig:
    min_replicas: int
    max_replicas: int
    ttft_slo_s: float
    tpot_slo_s: float
    out_window_s: float = 5.0
    in_hold_s: float = 30.0
    in_margin: float = 0.8  # scale in only if one replica fewer stays under this share of each SLO

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError("autoscale needs 1 <= min <= max replicas")
        if self.ttft_slo_s <= 0 or self.tpot_slo_s <= 0:
            raise ValueError("SLOs must be positive")


@dataclass(frozen=True)
class StepModel:
    """Measured step times of one replica."""
    prefill_s_per_token: float
    decode_step_s: float  # a decode step's fixed cost
    decode_s_per_seq: float  # and its cost per running sequence


@dataclass(frozen=True)
class LoadSample:
    now: float
    replicas: int
    waiting_prompt_tokens: int  # queued prompt tokens, all replicas
    running: int  # running sequences, all replicas
    prompt_tokens_per_s: float = 0.0  # prompt tokens arriving, all replicas (recent rate)


@dataclass(frozen=True)
class Decision:
    delta: int  # +1 scale out, -1 scale in, 0 hold
    reason: str
    predicted_ttft_s: float
    predicted_tpot_s: float


MAX_PREFILL_SHARE = 0.95


def predict(model: StepModel, sample: LoadSample, replicas: int) -> tuple[float, float]:
    """(TTFT of the last queued request, TPOT of running ones) with the load spread over `replicas`.
    Prompts arriving take a share of every replica's time (their chunks ride in the same steps as
    the decodes), and decodes get the rest: TPOT is the decode step's time stretched by that share."""
    ttft = sample.waiting_prompt_tokens / replicas * model.prefill_s_per_token
    prefill_share = min(MAX_PREFILL_SHARE, sample.prompt_tokens_per_s / replicas * model.prefill_s_per_token)
    tpot = (model.decode_step_s + sample.running / replicas * model.decode_s_per_seq) / (1 - prefill_share)
    return ttft, tpot


def _mean(values: list[float | None]) -> float:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else 0.0


def step_model(fitted, mean_context: float) -> StepModel:
    """The autoscaler's StepModel from a planner StepTimeModel fitted to a replica's own steps, at
    the running requests' mean context."""
    return StepModel(prefill_s_per_token=fitted.per_prefill_token_s, decode_step_s=fitted.fixed_s,
                     decode_s_per_seq=fitted.per_decode_seq_s + fitted.per_context_token_s * mean_context)


class Autoscaler:
    def __init__(self, config: AutoscaleConfig, model: StepModel | None) -> None:
        self.config, self.model = config, model  # model: None until steps have been measured
        self._window: deque[tuple[float, float, float]] = deque()  # (time, TTFT, TPOT) predicted at _count
        self._count = 0
        self._since = 0.0  # when predictions at _count began
        self._calm_since: float | None = None

    def decide(self, sample: LoadSample) -> Decision:
        c, r = self.config, sample.replicas
        if self.model is None:
            return Decision(0, "no step times measured yet", 0.0, 0.0)
        ttft, tpot = predict(self.model, sample, r)
        if r != self._count or not self._window:  # predictions at another count say nothing of this one
            self._window.clear()
            self._count, self._since = r, sample.now
        # A tick with nothing queued predicts no TTFT (and with nothing running no TPOT): it neither
        # misses nor meets, so it does not dilute the mean.
        self._window.append((sample.now, ttft if sample.waiting_prompt_tokens else None,
                             tpot if sample.running else None))
        while self._window[0][0] < sample.now - c.out_window_s:
            self._window.popleft()
        covered = sample.now - self._since >= c.out_window_s  # predictions span the whole window
        mean_ttft, mean_tpot = (_mean([w[k] for w in self._window]) for k in (1, 2))
        if (mean_ttft > c.ttft_slo_s or mean_tpot > c.tpot_slo_s) and r < c.max_replicas:
            self._calm_since = None
            if covered:
                self._window.clear()
                return Decision(+1, f"predicted TTFT {mean_ttft:.2f} s / TPOT {mean_tpot * 1e3:.0f} ms over the "
                                    f"SLO on average over {c.out_window_s:.0f} s at {r} replicas", ttft, tpot)
            return Decision(0, "over the SLO, within the window", ttft, tpot)
        fewer_ttft, fewer_tpot = predict(self.model, sample, r - 1) if r > 1 else (float("inf"),) * 2
        if r > c.min_replicas and fewer_ttft <= c.in_margin * c.ttft_slo_s and fewer_tpot <= c.in_margin * c.tpot_slo_s:
            self._calm_since = self._calm_since if self._calm_since is not None else sample.now
            if sample.now - self._calm_since >= c.in_hold_s:
                self._calm_since = None
                return Decision(-1, f"{r - 1} replicas would meet both SLOs with margin for {c.in_hold_s:.0f} s",
                                ttft, tpot)
            return Decision(0, "calm, within the hold", ttft, tpot)
        self._calm_since = None
        return Decision(0, "steady", ttft, tpot)
