"""Per-request KV policies: which tokens' K/V a request keeps once its cache outgrows its budget.

- `full`: everything (the default; exact).
- `streaming` (StreamingLLM, Xiao et al. 2023): the first `NUM_SINKS` tokens (attention sinks)
  and the most recent ones.
- `h2o` (Zhang et al. 2023): half the budget for the most recent tokens, the rest for the "heavy
  hitters", the older tokens with the most attention accumulated over the steps so far.
- `keyformer` (Adnan et al. 2024): a recent window plus the tokens with the highest accumulated
  Keyformer score, a softmax of the attention logits plus Gumbel noise at a temperature that rises
  from `KEYFORMER_TAU_INIT` to `KEYFORMER_TAU_END` over the generation.

One keep set per request serves every layer and head: the paged cache holds a request's tokens at
the same slots in every layer, so evicting a token frees its slot everywhere. A request's kept K/V
are compacted into the front of its block table (order kept) and the blocks past them freed; every
token keeps the position the model saw it at (RoPE is applied before K is cached), and a new token's
cache index is its position less the tokens evicted before it.

Eviction runs at the update point once the cache holds more than the budget, down to the budget
less one block, so the copying is paid once per block of new tokens rather than every step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from llmserve.errors import InvalidRequestError

KV_POLICIES = ("full", "streaming", "h2o", "keyformer")
SCORED_POLICIES = ("h2o", "keyformer")  # need the attention the kernels report
NUM_SINKS = 4  # StreamingLLM's attention sinks
H2O_RECENT_FRACTION = 0.5  # H2O splits its budget evenly between recent tokens and heavy hitters
KEYFORMER_RECENT_FRACTION = 0.3  # Keyformer's recent window, as a share of the budget
KEYFORMER_TAU_INIT, KEYFORMER_TAU_END = 1.0, 2.0
MIN_BUDGET_TOKENS = 8


def validate(policy: str | None, budget: float | int | None) -> None:
    """Raise InvalidRequestError for an unknown policy or a budget out of range."""
    if policy is not None and policy not in KV_POLICIES:
        raise InvalidRequestError(f"kv_policy must be one of {', '.join(KV_POLICIES)}")
    if budget is None:
        return
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise InvalidRequestError("kv_budget must be a fraction of the context in (0, 1] or a token count")
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise InvalidRequestError("kv_budget must be a fraction of the context in (0, 1] or a token count")
    if isinstance(budget, int) and budget < MIN_BUDGET_TOKENS:
        raise InvalidRequestError(f"kv_budget must be at least {MIN_BUDGET_TOKENS} tokens")


def budget_tokens(budget: float | int, num_tokens: int) -> int:
    """The budget in tokens for a request of num_tokens tokens: a token count as given, a fraction
    of the request's current length rounded up (at least MIN_BUDGET_TOKENS)."""
    if isinstance(budget, float):
        return max(MIN_BUDGET_TOKENS, math.ceil(budget * num_tokens))
    return budget


@dataclass(repr=False)
class KVPolicyState:
    """What a lossy request carries: its policy and budget, the position of each cached token (in
    cache order), and, for the scored policies, each cached token's accumulated score."""
    policy: str
    budget: float | int
    positions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float64))
    num_evicted: int = 0  # tokens whose K/V were dropped
    steps: int = 0  # generation steps scored so far (Keyformer's temperature schedule)
    seed: int | None = None  # of Keyformer's Gumbel noise (None: fresh entropy)
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    @property
    def scored(self) -> bool:
        return self.policy in SCORED_POLICIES

    def extend(self, first_position: int, count: int) -> None:
        """Record count newly cached tokens starting at first_position (scores start at zero)."""
        if count <= 0:
            return
        self.positions = np.concatenate([self.positions, np.arange(first_position, first_position + count)])
        self.scores = np.concatenate([self.scores, np.zeros(count)])

    def __repr__(self) -> str:
        return (f"KVPolicyState(policy={self.policy}, budget={self.budget}, cached={len(self.positions)}, "
                f"evicted={self.num_evicted})")


def keyformer_tau(step: int, total_steps: int) -> float:
    """Keyformer's temperature at generation step `step` of `total_steps`: linear from init to end."""
    if total_steps <= 1:
        return KEYFORMER_TAU_END
    return KEYFORMER_TAU_INIT + (KEYFORMER_TAU_END - KEYFORMER_TAU_INIT) * min(step, total_steps) / total_steps


def keyformer_scores(logits: np.ndarray, tau: float, rng: np.random.Generator) -> np.ndarray:
    """One step's Keyformer score of each key: softmax((logits + Gumbel noise) / tau) over the last
    axis, summed over the leading axes (heads, layers). logits: [..., keys], pre-softmax."""
    g = rng.gumbel(size=logits.shape)
    z = (logits + g) / tau
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    return p.reshape(-1, logits.shape[-1]).sum(axis=0)


def attention_scores(logits: np.ndarray) -> np.ndarray:
    """One step's H2O score of each key: its attention probability, summed over heads and layers."""
    z = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    return p.reshape(-1, logits.shape[-1]).sum(axis=0)


def select_keep(policy: str, positions: np.ndarray, scores: np.ndarray, target: int) -> np.ndarray:
    """Indices (into the cached tokens, ascending) of the `target` tokens the policy keeps.
    positions: each cached token's position, ascending; scores: its accumulated score."""
    n = len(positions)
    if target >= n:
        return np.arange(n)
    if policy == "streaming":
        sinks = min(NUM_SINKS, target)
        return np.concatenate([np.arange(sinks), np.arange(n - (target - sinks), n)]).astype(np.int64)
    if policy in SCORED_POLICIES:
        fraction = H2O_RECENT_FRACTION if policy == "h2o" else KEYFORMER_RECENT_FRACTION
        recent = min(target, max(1, int(round(target * fraction))))
        older = n - recent
        heavy = target - recent
        # The highest scores among the older tokens; ties go to the earlier token (a stable sort).
        order = np.argsort(-scores[:older], kind="stable")[:heavy]
        return np.sort(np.concatenate([order, np.arange(older, n)])).astype(np.int64)
    raise ValueError(f"no keep rule for kv policy {policy!r}")
