"""LLMEngine: add_request / abort_request / step. Synchronous; the async engine drives it."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from llmserve.config import EngineConfig
from llmserve.engine.detokenizer import IncrementalDetokenizer
from llmserve.engine.kv_cache import KVCacheManager
from llmserve.engine.request import Request, RequestStatus
from llmserve.engine.scheduler import Scheduler
from llmserve.engine.setup import EngineParts, build_engine_parts, default_token_budget
from llmserve.errors import InvalidRequestError, PromptTooLongError
from llmserve.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from llmserve.runner import StepResult
from llmserve.sampling.metadata import SamplingRow
from llmserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PROMPT_TAIL = 8  # prompt ids kept as decoding context for the first output tokens


@dataclass
class Sequence:
    """One of a request's n completions: a scheduler Request plus what the engine tracks for it."""
    index: int
    request: Request
    row: SamplingRow
    detok: IncrementalDetokenizer
    logprobs: list[PositionLogprobs] | None
    cumulative_logprob: float = 0.0


@dataclass
class RequestGroup:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    arrival_time: float
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return all(s.request.status.finished for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig, parts: EngineParts | None = None) -> None:
        self.config = config
        p = parts or build_engine_parts(config)
        self.tokenizer, self.model_config, self.runner = p.tokenizer, p.arch, p.runner
        self.max_model_len, self.eos_token_ids, self.model_name = p.max_model_len, p.eos_token_ids, p.model_name
        self.kv = KVCacheManager(p.num_blocks, config.block_size, config.enable_prefix_caching, config.wipe_kv_on_free)
        budget = config.max_num_batched_tokens or default_token_budget(p.device)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, budget, config.scheduling_policy)
        self.groups: dict[str, RequestGroup] = {}
        self._seq_of: dict[str, tuple[RequestGroup, Sequence]] = {}  # scheduler request id -> its group
        self._aborted: list[RequestOutput] = []
        self.device = p.device
        self.thread_governor = p.thread_governor

    # ---- requests -----------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None, *,
                    prompt: str | None = None, priority: int = 0, cache_salt: str | None = None,
                    deadline: float | None = None, arrival_time: float | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self.groups:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        ids = self._validate_prompt(prompt_token_ids)
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        now = time.monotonic() if arrival_time is None else arrival_time
        group = RequestGroup(request_id, prompt, ids, [], now,
                             prompt_logprobs=[None] if params.prompt_logprobs is not None else None)
        if deadline is None and self.config.ttft_slo is not None:
            deadline = now + self.config.ttft_slo
        for i in range(params.n):
            rid = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(rid, ids, params, max_tokens, self.eos_token_ids, priority, cache_salt, deadline, now)
            gen = None
            if params.seed is not None and not params.greedy:
                gen = torch.Generator(device=self.device).manual_seed(params.seed + i)
            row = SamplingRow(params, req.prompt_token_ids, req.output_token_ids, gen)
            detok = IncrementalDetokenizer(self.tokenizer, ids[-PROMPT_TAIL:], params.stop,
                                           params.include_stop_str_in_output, params.skip_special_tokens)
            group.seqs.append(Sequence(i, req, row, detok, [] if params.logprobs is not None else None))
        # Registered only once every sequence is built, so a failure above leaves nothing behind.
        self.groups[request_id] = group
        for seq in group.seqs:
            self._seq_of[seq.request.request_id] = (group, seq)
            self.scheduler.add(seq.request)

    def _validate_prompt(self, prompt_token_ids: list[int]) -> list[int]:
        ids = list(prompt_token_ids)
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens but the model's context is {self.max_model_len} tokens, "
                "leaving no room to generate")
        return ids

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Stop requests at any point; their blocks are freed (and wiped) at once."""
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            group = self.groups.pop(rid, None)
            if group is None:
                continue
            for seq in group.seqs:
                if not seq.request.status.finished:
                    self.scheduler.finish(seq.request, RequestStatus.FINISHED_ABORTED)
                self._seq_of.pop(seq.request.request_id, None)
            self._aborted.append(self._make_output(group))
        self.runner.wipe_blocks(self.kv.take_blocks_to_wipe())

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    # ---- the step -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch. Returns cumulative outputs of every request that changed."""
        outputs, self._aborted = self._aborted, []
        if self.thread_governor is not None:
            self.thread_governor.tick()
        sched = self.scheduler.schedule()
        # Blocks freed by preemption may already be handed to another request: wipe them before
        # this step's forward pass writes into them, not after.
        self.runner.wipe_blocks(self.kv.take_blocks_to_wipe())
        if sched.empty:
            return outputs
        for s in sched.scheduled:
            if s.samples:
                self._update_banned(self._seq_of[s.request.request_id][1])
        rows = {s.request.request_id: self._seq_of[s.request.request_id][1].row for s in sched.scheduled}
        start = time.perf_counter()
        result = self.runner.execute(sched, {rid: self.kv.block_ids(rid) for rid in rows}, rows)
        self.scheduler.observe_step(sched.num_tokens, time.perf_counter() - start)
        self.scheduler.update(sched)
        changed = self._record_prompt_logprobs(result, {s.request.request_id: s.start for s in sched.scheduled})
        changed.update(self._apply_samples(result))
        self.runner.wipe_blocks(self.kv.take_blocks_to_wipe())
        for group in changed.values():
            outputs.append(self._make_output(group))
            if group.finished:
                self._retire(group)
        return outputs

    def _update_banned(self, seq: Sequence) -> None:
        p, req = seq.request.params, seq.request
        if req.num_output_tokens < p.min_tokens:
            seq.row.banned_token_ids = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))
        else:
            seq.row.banned_token_ids = []

    def _apply_samples(self, result: StepResult) -> dict[str, RequestGroup]:
        changed: dict[str, RequestGroup] = {}
        if result.sampler_output is None:
            return changed
        out = result.sampler_output
        token_ids = out.token_ids.tolist()
        lp_ids = out.logprob_token_ids.tolist() if out.logprob_token_ids is not None else None
        lp_vals = out.logprobs.tolist() if out.logprobs is not None else None
        ranks = out.sampled_ranks.tolist() if out.sampled_ranks is not None else None
        now = time.monotonic()
        for i, s in enumerate(result.sampled):
            group, seq = self._seq_of[s.request.request_id]
            req, token = seq.request, token_ids[i]
            req.append_token(token)
            if req.first_token_time is None:
                req.first_token_time = now
            if seq.logprobs is not None and lp_ids is not None:
                seq.logprobs.append(_position_logprobs(lp_ids[i], lp_vals[i], ranks[i], req.params.logprobs))
                seq.cumulative_logprob += lp_vals[i][0]
            # Stop conditions count only from min_tokens on. A stop token's text is left out of the
            # output (as a stop string's is) unless include_stop_str_in_output.
            p = req.params
            may_stop = req.num_output_tokens >= p.min_tokens
            stop_token = may_stop and (token in p.stop_token_ids or (not p.ignore_eos and token in req.eos_token_ids))
            hit_stop_string = False
            if not stop_token or p.include_stop_str_in_output:
                hit_stop_string = seq.detok.add(token, check_stop=may_stop)
            status = self._check_finished(req, token, hit_stop_string)
            if status is not None:
                # As in vLLM: the stop string or stop token id that ended it; None for EOS and length.
                req.stop_reason = seq.detok.stop_string if hit_stop_string else (
                    token if status is RequestStatus.FINISHED_STOPPED and token in p.stop_token_ids else None)
                self.scheduler.finish(req, status)
            changed[group.request_id] = group
        return changed

    def _check_finished(self, req: Request, token: int, hit_stop_string: bool) -> RequestStatus | None:
        p = req.params
        if req.num_output_tokens >= p.min_tokens:
            if hit_stop_string or token in p.stop_token_ids or (not p.ignore_eos and token in req.eos_token_ids):
                return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _record_prompt_logprobs(self, result: StepResult, starts: dict[str, int]) -> dict[str, RequestGroup]:
        changed: dict[str, RequestGroup] = {}
        for rid, (ids, vals, ranks) in result.prompt_logprobs.items():
            group, seq = self._seq_of[rid]
            if seq.index != 0 or group.prompt_logprobs is None:
                continue  # n > 1: the prompt is the same for every sequence
            k = seq.request.params.prompt_logprobs
            # Row j scores prompt position starts[rid] + 1 + j. A preempted request recomputes its
            # prompt from the start; positions recorded before are kept, not appended again.
            for j, (row_ids, row_vals, rank) in enumerate(zip(ids.tolist(), vals.tolist(), ranks.tolist())):
                if starts[rid] + 1 + j < len(group.prompt_logprobs):
                    continue
                group.prompt_logprobs.append(_position_logprobs(row_ids, row_vals, rank, k))
            changed[group.request_id] = group
        return changed

    def _retire(self, group: RequestGroup) -> None:
        self.groups.pop(group.request_id, None)
        for seq in group.seqs:
            self._seq_of.pop(seq.request.request_id, None)

    def _make_output(self, group: RequestGroup) -> RequestOutput:
        finished = group.finished
        completions = []
        for seq in group.seqs:
            req = seq.request
            status = req.status
            completions.append(CompletionOutput(
                index=seq.index,
                text=seq.detok.visible_text(status.finished),
                token_ids=list(req.output_token_ids),
                finish_reason=status.value if status.finished else None,
                stop_reason=req.stop_reason,
                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
            ))
        first = group.seqs[0].request
        metrics = {"arrival_time": group.arrival_time}
        if first.first_scheduled_time is not None:
            metrics["first_scheduled_time"] = first.first_scheduled_time
        if first.first_token_time is not None:
            metrics["first_token_time"] = first.first_token_time
        if finished:
            metrics["finished_time"] = max(s.request.finished_time or 0.0 for s in group.seqs)
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, completions, finished,
                             prompt_logprobs=list(group.prompt_logprobs) if group.prompt_logprobs is not None else None,
                             num_cached_tokens=first.num_cached_tokens, metrics=metrics)

    # ---- introspection ------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_usage": self.kv.usage,
            "prefix_cache_queries": self.kv.prefix_queries,
            "prefix_cache_hits": self.kv.prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions,
        }


def _position_logprobs(ids: list[int], vals: list[float], sampled_rank: int, k: int | None) -> PositionLogprobs:
    """The chosen token with its rank, then the top-k tokens with ranks 1..k."""
    entry: PositionLogprobs = {ids[0]: (vals[0], sampled_rank)}
    for r, (t, v) in enumerate(zip(ids[1:1 + (k or 0)], vals[1:1 + (k or 0)]), start=1):
        entry.setdefault(t, (v, r))
    return entry
