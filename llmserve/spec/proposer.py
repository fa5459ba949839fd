"""The proposer interface and how many tokens each request drafts.

After each step's update the engine asks the proposer for the next step's drafts of the requests
that are decoding (one known token behind). How many:

* per request, from its recent acceptance (Request.spec_acceptance, updated by the scheduler
  after each verify run): the j-th draft token pays only if all j are likely to be accepted, so a
  request drafts the largest k <= num_speculative_tokens with acceptance^k >= MIN_RUN_CHANCE;
* globally, from load: a step verifies draft tokens only while its running requests plus the
  draft tokens stay within max_batch_tokens. A small decode batch is bound by reading the weights,
  so k more tokens cost little; a full one is bound by compute, where verification costs more than
  it saves, and speculation stops rather than slow the batch down.
* never past max_tokens (the last token comes from the target anyway) nor the context.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

from llmserve.engine.request import Request
from llmserve.spec.config import SpeculativeConfig

MIN_RUN_CHANCE = 0.2  # a draft token is worth verifying while P(it and all before it accepted) >= this
DEFAULT_MAX_BATCH_TOKENS = {"cpu": 32, "cuda": 256}


class Proposer(ABC):
    def __init__(self, config: SpeculativeConfig, device_type: str) -> None:
        self.config = config
        self.max_batch_tokens = (config.max_batch_tokens if config.max_batch_tokens is not None
                                 else DEFAULT_MAX_BATCH_TOKENS.get(device_type, 32))
        self.kv = None  # the engine's KVCacheManager, bound when the engine is built

    def bind(self, kv) -> None:
        self.kv = kv

    def draft_lengths(self, requests: list[Request], num_running: int) -> list[int]:
        """How many tokens each candidate drafts (0: none) under the step's speculation budget."""
        budget = self.max_batch_tokens - num_running
        lengths = []
        for req in requests:
            k = min(self._length_for(req), max(budget, 0))
            k = min(k, req.max_tokens - req.num_output_tokens - 1)
            if req.max_model_len is not None:
                k = min(k, req.max_model_len - req.num_tokens)
            k = max(k, 0)
            budget -= k
            lengths.append(k)
        return lengths

    def _length_for(self, req: Request) -> int:
        k_max = self.config.num_speculative_tokens
        if not self.config.adaptive:
            return k_max
        r = req.spec_acceptance
        if r >= 0.999:
            return k_max
        if r <= MIN_RUN_CHANCE:
            return 1  # keep probing with one token: acceptance can come back
        return max(1, min(k_max, int(math.log(MIN_RUN_CHANCE) / math.log(r))))

    def propose_for(self, running: list[Request]) -> None:
        """Set draft_token_ids of the running requests that decode next step (grammar requests
        never speculate: their matcher must see accepted tokens only)."""
        candidates = [r for r in running if r.num_computed_tokens == r.num_tokens - 1 and r.grammar is None
                      and not r.status.finished]
        if not candidates:
            return
        lengths = self.draft_lengths(candidates, len(running))
        chosen = [(r, k) for r, k in zip(candidates, lengths) if k > 0]
        if chosen:
            drafts = self.propose([r for r, _ in chosen], [k for _, k in chosen])
            for (req, _), d in zip(chosen, drafts):
                req.draft_token_ids = d

    @abstractmethod
    def propose(self, requests: list[Request], lengths: list[int]) -> list[list[int]]:
        """Up to lengths[i] draft tokens for each request (fewer or none where it has no guess)."""

    def wipe_blocks(self, block_ids: list[int]) -> None:
        """Zero what the proposer keeps of freed blocks (a draft model's own KV); nothing by default."""

    def forget(self, request_ids: list[str]) -> None:
        """Drop per-request state of requests that left; nothing by default."""
