"""What a draft token costs, measured: the threshold acceptance at which drafting pays.

A step's time is close to a + b * tokens (a: what every step costs, b: each scheduled token; both
fitted online, by exponentially weighted least squares over the steps the engine times). Adding a
draft token to a step of n decoding requests costs b plus the proposer's time per draft token d,
and yields P(it and every draft before it are accepted) tokens. The step yields n tokens in
a + b * n seconds without it, so the draft token pays while

    P(run accepted) >= n * (b + d) / (a + b * n)

One stream on hardware where a decode is bound by reading the weights (a >> b): drafting is
nearly free and pays at low acceptance. A full batch (b * n >> a) or a compute-bound machine: the
threshold nears 1 and speculation stops, which is the load backoff the engine needs.
"""
from __future__ import annotations

from dataclasses import dataclass

DECAY = 0.97  # weight of the past per observed step (about the last 30 steps count)
MIN_STEPS = 8  # steps observed before the fit is trusted


@dataclass
class StepCostModel:
    fallback: float = 0.2  # threshold until the fit is trusted
    _s0: float = 0.0
    _s1: float = 0.0
    _s2: float = 0.0
    _sy: float = 0.0
    _sxy: float = 0.0
    _steps: int = 0
    a: float | None = None  # seconds a step costs whatever its size
    b: float | None = None  # seconds per scheduled token
    draft_seconds_per_token: float = 0.0  # the proposer's time per draft token (EMA)

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        x, y = float(num_tokens), float(seconds)
        self._s0 = DECAY * self._s0 + 1.0
        self._s1 = DECAY * self._s1 + x
        self._s2 = DECAY * self._s2 + x * x
        self._sy = DECAY * self._sy + y
        self._sxy = DECAY * self._sxy + x * y
        self._steps += 1
        det = self._s0 * self._s2 - self._s1 * self._s1
        if det <= 1e-9 * max(self._s0 * self._s2, 1e-12):
            return  # steps of one size only: the split between a and b is unknown yet
        b = (self._s0 * self._sxy - self._s1 * self._sy) / det
        a = (self._sy - b * self._s1) / self._s0
        if b >= 0.0 and a >= 0.0:
            self.a, self.b = a, b

    def observe_drafting(self, num_draft_tokens: int, seconds: float) -> None:
        if num_draft_tokens > 0:
            self.draft_seconds_per_token += 0.2 * (seconds / num_draft_tokens - self.draft_seconds_per_token)

    def threshold(self, num_decoding: int) -> float:
        """The acceptance probability of a run at which one more draft token pays."""
        if self.a is None or self._steps < MIN_STEPS:
            return self.fallback
        n = max(num_decoding, 1)
        return n * (self.b + self.draft_seconds_per_token) / (self.a + self.b * n)
