"""LLMEngine: add_request / abort_request / step. Synchronous; the async engine drives it."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from llmserve.config import EngineConfig
from llmserve.engine.admission import Admission
from llmserve.engine.detokenizer import IncrementalDetokenizer
from llmserve.engine.kv_cache import KVCacheManager
from llmserve.engine.kv_offload import tier_for
from llmserve.engine.kv_policy import KVPolicyState
from llmserve.engine.request import Request, RequestStatus
from llmserve.engine.scheduler import Scheduler, SchedulerOutput
from llmserve.engine.setup import EngineParts, build_engine_parts, default_token_budget
from llmserve.errors import InvalidRequestError
from llmserve.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from llmserve.runner import StepResult, position_logprobs
from llmserve.sampling_params import SamplingParams
from llmserve.structured.compiler import GrammarCompiler, GrammarState

logger = logging.getLogger(__name__)

PROMPT_TAIL = 8  # prompt ids kept as decoding context for the first output tokens


@dataclass(repr=False)
class RequestGroup:
    """A client's request: its n sequences (scheduler Requests) and what they share."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Request]
    arrival_time: float
    prompt_logprobs: list[PositionLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return all(s.status.finished for s in self.seqs)

    def __repr__(self) -> str:  # prompt text and ids stay out of logs and tracebacks
        return f"RequestGroup(id={self.request_id!r}, n={len(self.seqs)}, prompt_tokens={len(self.prompt_token_ids)})"


class LLMEngine:
    def __init__(self, config: EngineConfig, parts: EngineParts | None = None) -> None:
        self.config = config
        p = parts or build_engine_parts(config)
        self.tokenizer, self.model_config, self.runner = p.tokenizer, p.arch, p.runner
        self.max_model_len, self.eos_token_ids, self.model_name = p.max_model_len, p.eos_token_ids, p.model_name
        self.kv = KVCacheManager(p.num_blocks, config.block_size, config.enable_prefix_caching, config.wipe_kv_on_free,
                                 private=config.private,
                                 windows=self.runner.layout.windows if self.runner.layout.page_specs else (),
                                 num_state_slots=p.num_state_slots)
        budget = config.max_num_batched_tokens or default_token_budget(p.device)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, budget, config.scheduling_policy)
        self.groups: dict[str, RequestGroup] = {}
        self._group_of: dict[str, RequestGroup] = {}  # scheduler request id -> its group
        self._aborted: list[RequestOutput] = []
        self.device = p.device
        self.thread_governor = p.thread_governor
        self.last_step_error: str | None = None  # exception type of the last failed step, until one succeeds
        # The last step's shape and time, for a step-time model (the autoscaler's): prompt tokens
        # computed, decoding sequences, the context positions the step's attention reads (summed
        # over its tokens: ScheduledRequest.attended), seconds.
        self.last_step_shape: tuple[int, int, int, float] | None = None
        # Structured outputs: compiled grammars cached by spec; the tokenizer's JSON is read lazily.
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self.admission = Admission.of(self.model_config, self.max_model_len, config, self.grammars)
        # Speculative decoding: drafts proposed after each update, verified in the next step.
        self.proposer = p.proposer
        if self.proposer is not None:
            self.proposer.bind(self.kv)
        self.tier = tier_for(config.kv_offload_dir, config.kv_offload_bytes, private=config.private)
        if self.tier is not None:
            self.kv.attach_tier(self.tier, self.runner.read_block, self.runner.write_block)

    # ---- requests -----------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None, *,
                    prompt: str | None = None, priority: int = 0, cache_salt: str | None = None,
                    deadline: float | None = None, arrival_time: float | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self.groups:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        a = self.admission.check(prompt_token_ids, params)
        ids, max_tokens, kv_state, grammar = a.token_ids, a.max_tokens, a.kv_state, a.grammar
        now = time.monotonic() if arrival_time is None else arrival_time
        group = RequestGroup(request_id, prompt, ids, [], now,
                             prompt_logprobs=[None] if params.prompt_logprobs is not None else None)
        if deadline is None and self.config.ttft_slo is not None:
            deadline = now + self.config.ttft_slo
        for i in range(params.n):
            rid = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(rid, ids, params, max_tokens, self.eos_token_ids, priority, cache_salt, deadline, now,
                          max_model_len=self.max_model_len,
                          logprobs=[] if params.logprobs is not None else None,
                          grammar=GrammarState(grammar.deep_copy()) if grammar is not None else None,
                          kv=KVPolicyState(kv_state.policy, kv_state.budget,
                                           seed=None if params.seed is None else params.seed + i)
                          if kv_state is not None else None)
            if params.seed is not None and not params.greedy:
                req.generator = torch.Generator(device=self.device).manual_seed(params.seed + i)
            req.detok = IncrementalDetokenizer(self.tokenizer, ids[-PROMPT_TAIL:], params.stop,
                                               params.include_stop_str_in_output, params.skip_special_tokens)
            group.seqs.append(req)
        self._register(group)

    def _register(self, group: RequestGroup) -> None:
        """Hand a fully built group to the scheduler (so a failure while building leaves nothing
        behind); a sequence that already holds computed KV (an imported one) goes straight to running."""
        self.groups[group.request_id] = group
        for req in group.seqs:
            self._group_of[req.request_id] = group
            if req.status.finished:
                continue
            if req.num_computed_tokens:
                self.scheduler.add_running(req)
            else:
                self.scheduler.add(req)

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Stop requests at any point; their blocks are freed (and wiped) at once."""
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            group = self._remove(rid, RequestStatus.FINISHED_ABORTED)
            if group is not None:
                self._aborted.append(self._make_output(group))
        self._wipe()

    def _remove(self, request_id: str, status: RequestStatus) -> RequestGroup | None:
        group = self.groups.pop(request_id, None)
        if group is None:
            return None
        for req in group.seqs:
            if not req.status.finished:
                self.scheduler.finish(req, status)
            self._group_of.pop(req.request_id, None)
        return group

    def _wipe(self) -> None:
        """Zero freed blocks (under wipe_kv_on_free) in the target's KV and in a draft model's own."""
        block_ids = self.kv.take_blocks_to_wipe()
        self.runner.wipe_blocks(block_ids)
        self.runner.wipe_state_slots(self.kv.take_state_slots_to_wipe())
        if self.proposer is not None and block_ids:
            self.proposer.wipe_blocks(block_ids)

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    # ---- moving requests between engines --------------------------------------------------
    def export_request(self, request_id: str, with_kv: bool = True) -> dict:
        """Take a request out of this engine as plain data (picklable): every sequence's state and,
        with_kv, the KV of its computed tokens. Another engine's `import_request` continues it."""
        group = self.groups.get(request_id)
        if group is None:
            raise InvalidRequestError(f"no request with id {request_id!r}")
        state = {"request_id": group.request_id, "prompt": group.prompt,
                 "prompt_token_ids": list(group.prompt_token_ids),
                 "arrival_age": time.monotonic() - group.arrival_time,
                 "prompt_logprobs": list(group.prompt_logprobs) if group.prompt_logprobs is not None else None,
                 "seqs": [req.to_state() for req in group.seqs], "kv": []}
        for req in group.seqs:
            running = req.status is RequestStatus.RUNNING and req.num_computed_tokens > 0
            rid = req.request_id
            state["kv"].append(self.runner.export_kv(self.kv.group_block_ids(rid), self.kv.state_slots.get(rid),
                                                     req.num_kv_tokens) if with_kv and running else None)
        self._remove(request_id, RequestStatus.FINISHED_ABORTED)
        self._wipe()
        return state

    def import_request(self, state: dict) -> None:
        """Continue a request exported by another engine of the same model. Sequences that come
        with their KV resume where they were; the others are recomputed from their tokens."""
        if state["request_id"] in self.groups:
            raise InvalidRequestError(f"request id {state['request_id']!r} is already in use")
        group = RequestGroup(state["request_id"], state["prompt"], list(state["prompt_token_ids"]), [],
                             time.monotonic() - state["arrival_age"], prompt_logprobs=state["prompt_logprobs"])
        seqs = [Request.from_state(seq_state, self.tokenizer, self.device) for seq_state in state["seqs"]]
        for req in seqs:  # before any block is allocated, so a refusal leaves nothing behind
            req.max_model_len = self.max_model_len
            if req.params.structured_outputs is not None and not req.status.finished:
                # The matcher is not carried: a fresh one replays the tokens produced so far.
                req.grammar = self.grammars.state(req.params.structured_outputs, replay=req.output_token_ids)
        for req, kv in zip(seqs, state["kv"]):
            if not req.status.finished:
                req.status, computed, req.num_computed_tokens = RequestStatus.WAITING, req.num_computed_tokens, 0
                policy = req.kv
                if policy is not None:  # allocated for the kept tokens; recomputed, it evicts afresh
                    req.kv = KVPolicyState(policy.policy, policy.budget, seed=policy.seed)
                if kv is not None:
                    # Allocated as computed (a window group takes only the blocks it still reads).
                    req.num_computed_tokens = kv.num_tokens
                    if self.kv.allocate(req, 0):
                        rid = req.request_id
                        self.runner.import_kv(self.kv.group_block_ids(rid), self.kv.state_slots.get(rid), kv)
                        req.num_computed_tokens, req.kv = computed, policy
                        self.kv.commit(req, computed)
                    else:
                        req.num_computed_tokens = 0
            group.seqs.append(req)
        self._register(group)

    # ---- the step -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch. Returns cumulative outputs of every request that changed."""
        outputs, self._aborted = self._aborted, []
        if self.thread_governor is not None:
            self.thread_governor.tick()
        if self.proposer is not None:
            # Drafts for this step, proposed here rather than at the end of the last step, so that
            # the tokens that step produced go out without waiting for the draft model.
            self._propose()
        sched = self.scheduler.schedule()
        self.runner.remove_requests(sched.left_ids)
        if self.proposer is not None:
            self.proposer.forget(sched.left_ids)
        # Blocks freed by preemption may already be handed to another request: wipe them before
        # this step's forward pass writes into them, not after.
        self._wipe()
        if sched.empty:
            return outputs
        start = time.perf_counter()
        try:
            result = self.runner.execute(sched, self.kv.tables, self.kv.state_slots)
        except Exception as e:  # noqa: BLE001 - a device or kernel error fails this step's requests only
            return outputs + self._fail_step(sched, e)
        self.last_step_error = None
        seconds = time.perf_counter() - start
        self.scheduler.observe_step(sched.num_tokens, seconds)
        decodes = sum(1 for s in sched.scheduled if s.start >= s.request.num_prompt_tokens)
        self.last_step_shape = (sched.num_tokens - decodes, decodes, sum(s.attended for s in sched.scheduled), seconds)
        if self.proposer is not None:
            self.proposer.cost.observe_step(sched.num_tokens, seconds)
        changed = {self._group_of[r.request_id].request_id: self._group_of[r.request_id]
                   for r in self.scheduler.update(sched, result.sampled_tokens(), result.kv_scores)}
        for m in self.scheduler.take_kv_moves():  # before the blocks they freed are wiped or reused
            self.runner.move_kv(m.request_id, m.src, m.dst)
        changed.update(self._record_prompt_logprobs(result, {s.request.request_id: s.start for s in sched.scheduled}))
        self._wipe()
        for group in changed.values():
            outputs.append(self._make_output(group))
            if group.finished:
                self._retire(group)
        return outputs

    def _propose(self) -> None:
        """Draft the next step's tokens. A proposer that fails costs only its drafts, never a request."""
        try:
            self.proposer.propose_for(self.scheduler.running)
        except Exception as e:  # noqa: BLE001 - drafts are an optimization; verification keeps outputs exact
            logger.warning("draft proposal failed with %s; this step verifies no drafts", type(e).__name__)
            for req in self.scheduler.running:
                req.draft_token_ids = []

    def _fail_step(self, sched: SchedulerOutput, error: Exception) -> list[RequestOutput]:
        """End the requests of a failed step with finish_reason "error" and free their blocks; the
        engine goes on with the rest. Only the exception's type is logged: its message may quote content."""
        self.last_step_error = type(error).__name__
        logger.error("a step of %d requests failed with %s; they end with an error", len(sched.scheduled),
                     type(error).__name__)
        self.kv.end_step()
        outputs = []
        for rid in dict.fromkeys(self._group_of[s.request.request_id].request_id for s in sched.scheduled):
            group = self._remove(rid, RequestStatus.FINISHED_ERROR)
            if group is not None:
                outputs.append(self._make_output(group))
        self._wipe()
        return outputs

    def _record_prompt_logprobs(self, result: StepResult, starts: dict[str, int]) -> dict[str, RequestGroup]:
        changed: dict[str, RequestGroup] = {}
        for rid, (ids, vals, ranks) in result.prompt_logprobs.items():
            group = self._group_of.get(rid)
            if group is None or group.seqs[0].request_id != rid or group.prompt_logprobs is None:
                continue  # n > 1: the prompt is the same for every sequence
            k = group.seqs[0].params.prompt_logprobs
            # Row j scores prompt position starts[rid] + 1 + j. A preempted request recomputes its
            # prompt from the start; positions recorded before are kept, not appended again.
            for j, (row_ids, row_vals, rank) in enumerate(zip(ids.tolist(), vals.tolist(), ranks.tolist())):
                if starts[rid] + 1 + j < len(group.prompt_logprobs):
                    continue
                group.prompt_logprobs.append(position_logprobs(row_ids, row_vals, rank, k))
            changed[group.request_id] = group
        return changed

    def _retire(self, group: RequestGroup) -> None:
        self.groups.pop(group.request_id, None)
        for req in group.seqs:
            self._group_of.pop(req.request_id, None)

    def _make_output(self, group: RequestGroup) -> RequestOutput:
        finished = group.finished
        completions = []
        for index, req in enumerate(group.seqs):
            status = req.status
            completions.append(CompletionOutput(
                index=index,
                text=req.detok.visible_text(status.finished),
                token_ids=list(req.output_token_ids),
                finish_reason=status.value if status.finished else None,
                stop_reason=req.stop_reason,
                logprobs=list(req.logprobs) if req.logprobs is not None else None,
                cumulative_logprob=req.cumulative_logprob if req.logprobs is not None else None,
            ))
        first = group.seqs[0]
        metrics = {"arrival_time": group.arrival_time}
        if first.first_scheduled_time is not None:
            metrics["first_scheduled_time"] = first.first_scheduled_time
        if first.first_token_time is not None:
            metrics["first_token_time"] = first.first_token_time
        if finished:
            metrics["finished_time"] = max(s.finished_time or 0.0 for s in group.seqs)
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, completions, finished,
                             prompt_logprobs=list(group.prompt_logprobs) if group.prompt_logprobs is not None else None,
                             num_cached_tokens=first.num_cached_tokens, metrics=metrics,
                             num_draft_tokens=sum(s.num_draft_tokens for s in group.seqs),
                             num_accepted_tokens=sum(s.num_accepted_tokens for s in group.seqs),
                             kv_policy=first.kv.policy if first.kv is not None else None,
                             num_evicted_tokens=sum(s.num_evicted_tokens for s in group.seqs))

    # ---- introspection ------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_usage": self.kv.usage,
            "prefix_cache_queries": self.kv.prefix_queries,
            "prefix_cache_hits": self.kv.prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            # Speculative decoding (zero without it): verify runs, draft tokens, accepted ones.
            "spec_decode_num_drafts": self.scheduler.num_spec_drafts,
            "spec_decode_num_draft_tokens": self.scheduler.num_spec_draft_tokens,
            "spec_decode_num_accepted_tokens": self.scheduler.num_spec_accepted_tokens,
            # The disk tier (zero without one): prompt tokens read back from it, bytes moved and held.
            "prefix_cache_disk_hits": self.kv.disk_hits,
            "kv_offload_bytes_written": self.tier.bytes_written if self.tier is not None else 0,
            "kv_offload_bytes_read": self.tier.bytes_read if self.tier is not None else 0,
            "kv_offload_bytes_stored": self.tier.bytes_stored if self.tier is not None else 0,
        }

    def shutdown(self) -> None:
        """Release what outlives a step: the disk tier's files (and its key) go."""
        if self.tier is not None:
            self.tier.close()
