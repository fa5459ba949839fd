"""What the engine hands back: vLLM-shaped RequestOutput / CompletionOutput."""
from __future__ import annotations

from dataclasses import dataclass, field

# One position's logprobs: token id -> (logprob, rank). Rank 1 is the most likely token.
Logprob = tuple[float, int]
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:  # content stays out of logs and tracebacks
        return (f"CompletionOutput(index={self.index}, num_tokens={len(self.token_ids)}, "
                f"finish_reason={self.finish_reason!r})")


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    # Speculative decoding, over the request's sequences: draft tokens verified, and accepted.
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # The KV policy that ran (None: full, every token kept) and the tokens it evicted, over the sequences.
    kv_policy: str | None = None
    num_evicted_tokens: int = 0

    def __repr__(self) -> str:
        return (f"RequestOutput(request_id={self.request_id!r}, num_prompt_tokens={len(self.prompt_token_ids)}, "
                f"outputs={self.outputs!r}, finished={self.finished})")
