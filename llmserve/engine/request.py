"""A request as the engine sees it: one sequence's whole state, movable between engines.

Its token ids and text never appear in its repr. `to_state()` gives plain picklable data (no
tensors, no tokenizer), `from_state()` rebuilds the request in another engine, where it continues
with exactly the tokens it would have produced (its seeded generator travels with it). A
structured-output request's grammar matcher is not carried: its spec travels in the params, and
the importing engine compiles it and replays the output tokens through a fresh matcher
(`LLMEngine.import_request`), which puts it in exactly the state it had.
"""
from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from llmserve.engine.detokenizer import IncrementalDetokenizer
from llmserve.engine.kv_policy import KVPolicyState
from llmserve.outputs import PositionLogprobs
from llmserve.sampling_params import SamplingParams
from llmserve.structured.compiler import GrammarState


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting line, its KV dropped, to be recomputed
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # the step that ran it failed (a device or kernel error)

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                       RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR})

# Times are monotonic-clock instants, which mean nothing on another host: a state carries ages.
_TIMES = ("arrival_time", "deadline", "first_scheduled_time", "first_token_time", "finished_time")


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: params.max_tokens capped by the context left after the prompt
    eos_token_ids: tuple[int, ...] = ()
    priority: int = 0  # lower runs first under the "priority" policy
    cache_salt: str | None = None  # requests share cached KV only when their salts are equal
    deadline: float | None = None  # absolute time by which the first token is due ("deadline" policy)
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # of those, tokens found in the prefix cache at first admission
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    output_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # prompt + output, appended in place
    # What the engine tracks beside the ids; the update point (Scheduler.update) advances them.
    detok: IncrementalDetokenizer | None = None
    generator: torch.Generator | None = None  # seeded requests only; its state carries over steps
    grammar: GrammarState | None = None  # structured outputs only; advanced with every accepted token
    logprobs: list[PositionLogprobs] | None = None  # per output token, when params.logprobs is set
    cumulative_logprob: float = 0.0
    max_model_len: int | None = None  # the engine's context limit (a length stop)
    # Speculative decoding: tokens a proposer drafted for the next step (verified there, never
    # part of token_ids until accepted), the counts so far, and an estimate of the chance that a
    # draft token is accepted (the proposer sizes the next draft from it).
    draft_token_ids: list[int] = field(default_factory=list)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    spec_acceptance: float = 0.7
    # A lossy KV policy (engine/kv_policy.py): which tokens' K/V are still cached; None: all are.
    kv: KVPolicyState | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_kv_tokens(self) -> int:
        """Tokens whose K/V the cache holds: the computed ones less those a KV policy evicted. A new
        token's cache index is its position less the evicted count."""
        return self.num_computed_tokens - (self.kv.num_evicted if self.kv is not None else 0)

    @property
    def num_evicted_tokens(self) -> int:
        return self.kv.num_evicted if self.kv is not None else 0

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def banned_token_ids(self) -> list[int]:
        """Tokens the sampler must not pick now: stop tokens and EOS until min_tokens are out."""
        p = self.params
        if self.num_output_tokens >= p.min_tokens:
            return []
        return list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)

    # ---- moving between engines -----------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """The whole request as plain data (picklable; ids are data here, never logged)."""
        now = time.monotonic()
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name not in ("detok", "generator", "grammar", "params", "token_ids", "status", "draft_token_ids")
                 + _TIMES}
        state["output_token_ids"] = list(self.output_token_ids)
        state["prompt_token_ids"] = list(self.prompt_token_ids)
        state["logprobs"] = [dict(p) for p in self.logprobs] if self.logprobs is not None else None
        state["params"] = dataclasses.asdict(self.params)
        state["status"] = self.status.value
        state["ages"] = {name: None if getattr(self, name) is None else now - getattr(self, name) for name in _TIMES}
        state["generator_state"] = (bytes(self.generator.get_state().numpy().tobytes())
                                    if self.generator is not None else None)
        state["detok"] = self.detok.to_state() if self.detok is not None else None
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any], tokenizer: object, device: torch.device) -> Request:
        fields = {k: v for k, v in state.items()
                  if k not in ("params", "status", "ages", "generator_state", "detok")}
        fields["params"] = SamplingParams(**state["params"])
        fields["status"] = RequestStatus(state["status"])
        fields["eos_token_ids"] = tuple(state["eos_token_ids"])
        now = time.monotonic()
        for name, age in state["ages"].items():
            fields[name] = None if age is None else now - age
        req = cls(**fields)
        if state["generator_state"] is not None:
            req.generator = torch.Generator(device=device)
            req.generator.set_state(torch.frombuffer(bytearray(state["generator_state"]), dtype=torch.uint8))
        if state["detok"] is not None:
            req.detok = IncrementalDetokenizer.from_state(state["detok"], tokenizer)
        return req

    def __repr__(self) -> str:
        return (f"Request(id={self.request_id!r}, status={self.status.value}, prompt_tokens={self.num_prompt_tokens}, "
                f"output_tokens={self.num_output_tokens}, computed={self.num_computed_tokens})")

    __str__ = __repr__
