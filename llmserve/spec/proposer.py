"""The proposer interface and how many tokens each request drafts.

Before each step the engine asks the proposer for the drafts of the requests that are decoding (one
known token behind). How many: a request drafts its j-th token while the chance that all j are
accepted (its recent acceptance to the power j; Request.spec_acceptance, updated by the scheduler
after each verify run) stays above what a draft token costs (spec/cost.py: measured step times and
drafting time, so a batch that is bound by compute, or a draft that is slow, drafts less, and a full
batch drafts nothing). A request below the threshold does not draft; its estimate creeps back up
by RECOVERY a step so that it probes again now and then (text can turn repetitive later). Never
past max_tokens (the last token comes from the target anyway) nor the context; and never more than
max_batch_tokens for the step's running requests and drafts together (a hard cap under load).
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod

from llmserve.engine.request import Request
from llmserve.spec.config import SpeculativeConfig
from llmserve.spec.cost import StepCostModel

MIN_RUN_CHANCE = 0.2  # the threshold until step costs are measured (spec/cost.py)
RECOVERY = 0.01  # a non-drafting request's acceptance estimate creeps up by this a step
DEFAULT_MAX_BATCH_TOKENS = {"cpu": 32, "cuda": 256}


class Proposer(ABC):
    def __init__(self, config: SpeculativeConfig, device_type: str) -> None:
        self.config = config
        self.max_batch_tokens = (config.max_batch_tokens if config.max_batch_tokens is not None
                                 else DEFAULT_MAX_BATCH_TOKENS.get(device_type, 32))
        self.kv = None  # the engine's KVCacheManager, bound when the engine is built
        self.cost = StepCostModel(fallback=MIN_RUN_CHANCE)  # the engine reports step times to it

    def bind(self, kv) -> None:
        self.kv = kv

    def draft_lengths(self, requests: list[Request], num_running: int) -> list[int]:
        """How many tokens each candidate drafts (0: none) under the step's speculation budget."""
        budget = self.max_batch_tokens - num_running
        threshold = self.cost.threshold(len(requests))
        lengths = []
        for req in requests:
            k = min(self._length_for(req, threshold), max(budget, 0))
            k = min(k, req.max_tokens - req.num_output_tokens - 1)
            if req.max_model_len is not None:
                k = min(k, req.max_model_len - req.num_tokens)
            k = max(k, 0)
            budget -= k
            lengths.append(k)
        return lengths

    def _length_for(self, req: Request, threshold: float) -> int:
        k_max = self.config.num_speculative_tokens
        if not self.config.adaptive:
            return k_max
        r, run, k = req.spec_acceptance, 1.0, 0
        while k < k_max:
            run *= r
            if run < threshold:
                break
            k += 1
        if k == 0:
            req.spec_acceptance = min(1.0, r + RECOVERY)
        return k

    def propose_for(self, running: list[Request]) -> None:
        """Set draft_token_ids of the running requests that decode next step (grammar requests
        never speculate: their matcher must see accepted tokens only; nor do requests under a lossy KV
        policy, whose compacted tables a draft model's cache would not follow)."""
        candidates = [r for r in running if r.num_computed_tokens == r.num_tokens - 1 and r.grammar is None
                      and r.kv is None and not r.status.finished]
        if not candidates:
            return
        for req in candidates:  # drafts of a step that did not run are not carried over
            req.draft_token_ids = []
        lengths = self.draft_lengths(candidates, len(running))
        chosen = [(r, k) for r, k in zip(candidates, lengths) if k > 0]
        if chosen:
            start = time.perf_counter()
            drafts = self.propose([r for r, _ in chosen], [k for _, k in chosen])
            self.cost.observe_drafting(sum(len(d) for d in drafts), time.perf_counter() - start)
            for (req, _), d in zip(chosen, drafts):
                req.draft_token_ids = d

    @abstractmethod
    def propose(self, requests: list[Request], lengths: list[int]) -> list[list[int]]:
        """Up to lengths[i] draft tokens for each request (fewer or none where it has no guess)."""

    def wipe_blocks(self, block_ids: list[int]) -> None:
        """Zero what the proposer keeps of freed blocks (a draft model's own KV); nothing by default."""

    def forget(self, request_ids: list[str]) -> None:
        """Drop per-request state of requests that left; nothing by default."""
