"""One token budget per step (DESIGN principle 1: no prefill or decode phase).

Each request has num_computed_tokens and a target (all its known tokens). A step hands out
tokens in this order until the budget is spent: running requests first (a decode is simply a
request one token behind; a partly prefilled prompt continues with the next chunk), then waiting
requests are admitted with whatever chunk fits. When KV blocks run out, the policy's least
deserving running request is preempted and recomputed later from its tokens.

`update()` is the one place where a step's results land: computed tokens advance, finished blocks
are published, accepted tokens are appended (0..k+1 per request) with every stop rule applied in
token order, text is detokenized, and finished requests are freed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from llmserve.engine import kv_policy
from llmserve.engine.kv_cache import KVCacheManager
from llmserve.engine.request import Request, RequestStatus
from llmserve.outputs import PositionLogprobs


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # known tokens and draft tokens alike: a verify run is 1 + k tokens
    start: int  # num_computed_tokens when scheduled: the position of the first new token
    # Draft tokens verified this step: the last num_draft of the new tokens (speculative decoding).
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def num_draft(self) -> int:
        return len(self.draft_token_ids)

    @property
    def attended(self) -> int:
        """Context positions this chunk's attention reads, summed over its tokens (a decode: its
        context; a prompt chunk: each token's prefix and itself): the step-time model's attention term."""
        n = self.num_new_tokens
        return n * self.start + n * (n + 1) // 2

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the request's last known token, so a new one is sampled
        (with drafts: 1 + k positions are scored and the accepted run comes back)."""
        return self.start + self.num_new_tokens - self.num_draft == self.request.num_tokens


@dataclass
class SampledTokens:
    """What one request accepted this step: its new tokens in order (0..k+1 of them), with their
    logprob entries when the request asked for logprobs. With k draft tokens verified, the first
    len(token_ids) - 1 are accepted drafts and the last is the target's own next token."""
    request: Request
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None = None
    num_draft: int = 0  # draft tokens verified this step (0 without speculation)


@dataclass
class KVMoves:
    """A lossy request's compaction: copy the cache slots src to dst (every layer, K and V), before
    the blocks it freed are wiped or reused."""
    request_id: str
    src: np.ndarray
    dst: np.ndarray


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # Requests that left the running set since the last schedule (finished, aborted, preempted):
    # the runner drops their rows before it writes this step's.
    left_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, policy: str = "fcfs") -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.prefill_seconds_per_token = 1e-3  # refined by observe_step
        self.num_preemptions = 0
        # Speculative decoding counters (vLLM's spec_decode_num_*): verify runs, tokens drafted
        # into them, tokens of those accepted.
        self.num_spec_drafts = 0
        self.num_spec_draft_tokens = 0
        self.num_spec_accepted_tokens = 0
        self._left: list[str] = []
        self._kv_moves: list[KVMoves] = []  # compactions of this update, for the runner

    # ---- queue management -------------------------------------------------------------
    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def add_running(self, req: Request) -> None:
        """Take in a request that already holds blocks for its computed tokens (an imported one)."""
        req.status = RequestStatus.RUNNING
        if req.first_scheduled_time is None:
            req.first_scheduled_time = time.monotonic()
        self.running.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Remove req from the queues and free its blocks at once."""
        req.status = status
        req.finished_time = time.monotonic()
        self._left.append(req.request_id)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)

    def _rank(self, req: Request) -> tuple:
        """Sort key of running requests: smaller is served first, the largest is preempted first."""
        if self.policy == "priority":
            return (req.priority, req.arrival_time)
        if self.policy == "deadline":
            # A TTFT deadline matters only until the first token is out; after that (or without
            # one) a request ranks by arrival, behind every request still racing its deadline.
            if req.deadline is not None and req.first_token_time is None:
                return (0, req.deadline, req.arrival_time)
            return (1, 0.0, req.arrival_time)
        return (req.arrival_time,)

    def _admission_key(self, req: Request, now: float) -> tuple:
        """Sort key of waiting requests. The deadline policy admits by TTFT slack: the time left
        before the first token is due, less the estimated time to prefill what is left. Requests
        that can still make it go first, least slack first; those that cannot go after them."""
        if self.policy != "deadline":
            return self._rank(req)
        if req.deadline is None:
            return (2, 0.0, req.arrival_time)
        slack = req.deadline - now - (req.num_tokens - req.num_computed_tokens) * self.prefill_seconds_per_token
        return (0, slack, req.arrival_time) if slack >= 0 else (1, req.deadline, req.arrival_time)

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """Keep a moving estimate of the time per scheduled token, for prefill time estimates."""
        if num_tokens > 0:
            self.prefill_seconds_per_token += 0.1 * (seconds / num_tokens - self.prefill_seconds_per_token)

    # ---- the step ---------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        now = time.monotonic()

        # Running requests: decodes first, then prompts being prefilled in chunks, so a long
        # prompt never stalls the decodes; within each, by the policy's rank.
        chosen: dict[int, ScheduledRequest] = {}
        for req in sorted(self.running, key=lambda r: (r.num_tokens - r.num_computed_tokens > 1, self._rank(r))):
            if budget <= 0:
                break
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this step
            n = self._scoring_chunk(req, min(req.num_tokens - req.num_computed_tokens, budget), req.num_computed_tokens)
            drafts = self._drafts(req, n, budget)
            req.draft_token_ids = []  # consumed: the next step's drafts are proposed after this one
            if drafts and not self.kv.allocate(req, n + len(drafts)):
                drafts = []  # memory is short: verify nothing rather than preempt anyone
            n += len(drafts)
            while not self.kv.allocate(req, n):
                # Out of blocks: preempt the least deserving running request, even one already
                # given tokens this step (its tokens go back to the budget).
                victim = max(self.running, key=self._rank)
                self._preempt(victim)
                out.preempted.append(victim)
                undone = chosen.pop(id(victim), None)
                if undone is not None:
                    out.scheduled.remove(undone)
                    budget += undone.num_new_tokens
                if victim is req:
                    break
            else:
                sched = ScheduledRequest(req, n, req.num_computed_tokens, drafts)
                chosen[id(req)] = sched
                out.scheduled.append(sched)
                budget -= n

        # Admit waiting requests only when nothing was preempted: memory is short otherwise.
        if not out.preempted:
            self.waiting.sort(key=lambda r: self._admission_key(r, now))
            i = 0
            while i < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
                req = self.waiting[i]
                # Prompt logprobs need every prompt position computed, so they skip the cache.
                prefix = None if req.params.prompt_logprobs is not None else self.kv.find_cached_prefix(req)
                num_hits = prefix.num_blocks if prefix is not None else 0
                if prefix is not None and self.kv.in_flight_prefix(req, num_hits):
                    i += 1  # its next blocks are being written this step: hit them next step
                    continue
                num_cached = num_hits * self.kv.block_size
                n = self._scoring_chunk(req, min(req.num_tokens - num_cached, budget), num_cached)
                if not self.kv.allocate(req, n, prefix):
                    break
                self.waiting.pop(i)
                if req.params.prompt_logprobs is None:
                    self.kv.record_prefix_lookup(req.num_tokens, num_cached)
                req.num_computed_tokens = num_cached
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = now
                    req.num_cached_tokens = num_cached
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                out.scheduled.append(ScheduledRequest(req, n, num_cached))
                budget -= n
        out.left_ids, self._left = self._left, []
        return out

    @staticmethod
    def _scoring_chunk(req: Request, n: int, computed: int) -> int:
        """A prompt under a scored KV policy computes its last token alone: that step is a decode
        whose attention over the whole prompt gives the first scores, before anything is evicted."""
        if req.kv is not None and req.kv.scored and req.kv.steps == 0 and n > 1 \
                and computed + n == req.num_tokens:
            return n - 1
        return n

    @staticmethod
    def _drafts(req: Request, n: int, budget: int) -> list[int]:
        """The draft tokens req verifies this step: only a decode (one known token behind) has
        any, as many as the budget leaves room for after its own token."""
        if not req.draft_token_ids or req.kv is not None or n != 1 or req.num_tokens - req.num_computed_tokens != 1:
            return []
        room = budget - 1
        if req.max_model_len is not None:  # a draft's position must stay inside the context
            room = min(room, req.max_model_len - req.num_tokens)
        return req.draft_token_ids[:max(room, 0)]

    def _preempt(self, req: Request) -> None:
        req.draft_token_ids = []
        self._left.append(req.request_id)
        self.running.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        if req.kv is not None:  # recomputed from its tokens, evicting afresh
            req.kv = kv_policy.KVPolicyState(req.kv.policy, req.kv.budget, seed=req.kv.seed)
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(req)  # the sort by rank puts it back in its place in line

    def update(self, out: SchedulerOutput, sampled: list[SampledTokens] = (),
               kv_scores: dict[str, np.ndarray] | None = None) -> list[Request]:
        """THE update point, after the forward pass. Advances computed tokens and publishes the
        blocks they filled, then appends each request's accepted tokens in order, applying
        min_tokens, stop tokens, stop strings, max_tokens and the context limit token by token: a
        run of tokens is cut where the request stops. Finished requests are freed. Returns the
        requests that gained tokens. Lossy requests (a KV policy) add this step's attention
        scores (kv_scores, by request id) and evict what exceeds their budget."""
        for s in out.scheduled:
            req = s.request
            # Draft positions count as computed only once accepted (below).
            req.num_computed_tokens = s.start + s.num_new_tokens - s.num_draft
            self.kv.commit(req, min(req.num_computed_tokens, req.num_tokens))
            if req.kv is not None:
                req.kv.extend(s.start, s.num_new_tokens)
        self.kv.end_step()
        now = time.monotonic()
        changed = []
        for new in sampled:
            req = new.request
            if req.status.finished:
                continue
            for i, token in enumerate(new.token_ids):
                self._append(req, token, new.logprobs[i] if new.logprobs is not None else None)
                if req.status.finished:
                    break
            if new.num_draft:
                self._settle_drafts(req, new.num_draft, len(new.token_ids) - 1)
            if req.first_token_time is None:
                req.first_token_time = now
            changed.append(req)
        for s in out.scheduled:
            if s.request.kv is not None and not s.request.status.finished:
                self._apply_kv_policy(s.request, (kv_scores or {}).get(s.request.request_id))
        return changed

    def _apply_kv_policy(self, req: Request, scores: np.ndarray | None) -> None:
        """Add the step's scores; once the cache holds more than the budget, keep the policy's
        choice of the budget less one block and record the moves that compact it."""
        state = req.kv
        if scores is not None:
            state.scores[:len(scores)] += scores
            state.steps += 1
        if state.scored and state.steps == 0:
            return  # a scored policy evicts only once its tokens have scores (the prompt's last token attended)
        budget = kv_policy.budget_tokens(state.budget, req.num_tokens)
        if len(state.positions) <= budget:
            return
        target = max(budget - self.kv.block_size, (budget + 1) // 2)
        keep = kv_policy.select_keep(state.policy, state.positions, state.scores, target)
        src, dst = self.kv.compact(req, keep)
        state.num_evicted += len(state.positions) - len(keep)
        state.positions, state.scores = state.positions[keep], state.scores[keep]
        self._kv_moves.append(KVMoves(req.request_id, src, dst))

    def take_kv_moves(self) -> list[KVMoves]:
        moves, self._kv_moves = self._kv_moves, []
        return moves

    def _settle_drafts(self, req: Request, num_draft: int, num_accepted: int) -> None:
        """After a verify run: count it, and (unless the request finished) make the accepted drafts'
        KV computed and publish their full blocks. The rejected drafts are rolled back by not
        counting them: their slots stay in the request's blocks, unpublished (a block is published
        only once computed tokens fill it), and the next tokens overwrite them. The blocks are kept
        rather than cut back: the runner's persistent rows assume a table only grows, or shrinks
        before they see it again, and the next drafts would take blocks again at once."""
        self.num_spec_drafts += 1
        self.num_spec_draft_tokens += num_draft
        self.num_spec_accepted_tokens += num_accepted
        req.num_draft_tokens += num_draft
        req.num_accepted_tokens += num_accepted
        # Acceptance per draft token, as a geometric run estimates it (a run that stopped at a
        # rejection counts that one trial), smoothed over the recent verify runs.
        trials = num_accepted + (1 if num_accepted < num_draft else 0)
        req.spec_acceptance += 0.3 * (num_accepted / trials - req.spec_acceptance)
        if req.status.finished:
            return
        req.num_computed_tokens += num_accepted
        self.kv.commit(req, min(req.num_computed_tokens, req.num_tokens))

    def _append(self, req: Request, token: int, logprobs: PositionLogprobs | None) -> None:
        req.append_token(token)
        if req.logprobs is not None and logprobs is not None:
            req.logprobs.append(logprobs)
            req.cumulative_logprob += logprobs[token][0]
        # Stop conditions count only from min_tokens on. A stop token's text is left out of the
        # output (as a stop string's is) unless include_stop_str_in_output.
        p = req.params
        # Structured outputs: the grammar sees every accepted token. One that completes it (no
        # token but EOS could follow) ends the sequence here, as a stop, as vLLM's does.
        grammar_done = req.grammar is not None and req.grammar.advance(token)
        may_stop = req.num_output_tokens >= p.min_tokens
        stop_token = may_stop and (token in p.stop_token_ids or (not p.ignore_eos and token in req.eos_token_ids))
        hit_stop_string = False
        if req.detok is not None and (not stop_token or p.include_stop_str_in_output):
            hit_stop_string = req.detok.add(token, check_stop=may_stop)
        if stop_token or hit_stop_string:
            # As in vLLM: the stop string or stop token id that ended it; None for EOS.
            req.stop_reason = req.detok.stop_string if hit_stop_string else (
                token if token in p.stop_token_ids else None)
            self.finish(req, RequestStatus.FINISHED_STOPPED)
        elif grammar_done:
            self.finish(req, RequestStatus.FINISHED_STOPPED)
        elif req.num_output_tokens >= req.max_tokens or (
                req.max_model_len is not None and req.num_tokens >= req.max_model_len):
            self.finish(req, RequestStatus.FINISHED_LENGTH)
