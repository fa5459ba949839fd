"""Per-request generation parameters, shaped like vLLM's SamplingParams."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from llmserve.engine.kv_policy import validate as validate_kv_policy
from llmserve.errors import InvalidRequestError
from llmserve.structured.params import StructuredOutputsParams

MAX_STOP_STRINGS = 16
# Stop strings are searched for in the text's tail as long as the longest one, and text that could
# begin one is held back: their length bounds the work per token, so it is bounded too.
MAX_STOP_CHARS = 4096  # all stop strings of a request together
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
MAX_LOGPROBS = 20
MAX_N = 16
# torch.Generator.manual_seed takes any integer that fits a uint64 or an int64 (a negative seed is
# read as its two's complement) and raises beyond. Sequence i of a request draws with seed + i.
MIN_SEED = -(1 << 63)
MAX_SEED = (1 << 64) - 1


def seed_in_range(seed: int, n: int = 1) -> bool:
    """Whether seed, seed + 1, ..., seed + n - 1 are all seeds torch accepts."""
    return MIN_SEED <= seed and seed + n - 1 <= MAX_SEED


@dataclass(repr=False)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # top-N logprobs per generated token (the sampled one is always given)
    prompt_logprobs: int | None = None
    # token id -> a bias in [-100, 100] added to its logit before sampling (OpenAI's logit_bias)
    logit_bias: dict[int, float] | None = None
    # The output must match a JSON schema, regex, choice or grammar (see llmserve.structured).
    structured_outputs: StructuredOutputsParams | None = None
    # Which tokens' K/V to keep (engine/kv_policy.py): None takes the engine's default; a lossy
    # policy keeps kv_budget tokens (a count, or a fraction in (0, 1] of the request's length).
    kv_policy: str | None = None
    kv_budget: float | int | None = None

    def __post_init__(self) -> None:
        self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        if self.logit_bias is not None:  # keys arrive as strings from JSON (and from to_state round trips)
            self.logit_bias = {_token_key(k): v for k, v in self.logit_bias.items()} if isinstance(
                self.logit_bias, dict) else self.logit_bias
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise InvalidRequestError(msg)

        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            bad(f"n must be an integer in [1, {MAX_N}]")
        if not 0.0 <= self.temperature <= 100.0:
            bad("temperature must be in [0, 100]")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k must be -1, 0 or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p must be in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            bad("repetition_penalty must be in (0, 10]")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens must be a positive integer")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens must be a non-negative integer")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens must not exceed max_tokens")
        if len(self.stop) > MAX_STOP_STRINGS:
            bad(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop strings must be non-empty strings")
        if sum(len(s) for s in self.stop) > MAX_STOP_CHARS:
            bad(f"stop strings must total at most {MAX_STOP_CHARS} characters")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or len(self.logit_bias) > MAX_LOGIT_BIAS:
                bad(f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids to biases")
            for t, b in self.logit_bias.items():
                if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                    bad("logit_bias keys must be non-negative token ids")
                if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100.0 <= b <= 100.0:
                    bad("logit_bias values must be numbers in [-100, 100]")
        if self.structured_outputs is not None:
            self.structured_outputs.validate()
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids must be non-negative integers")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or not 0 <= v <= MAX_LOGPROBS):
                bad(f"{name} must be an integer in [0, {MAX_LOGPROBS}]")
        validate_kv_policy(self.kv_policy, self.kv_budget)
        if self.seed is not None:
            if not isinstance(self.seed, int) or isinstance(self.seed, bool):
                bad("seed must be an integer")
            if not seed_in_range(self.seed, self.n):
                bad(f"seed must be an integer in [{MIN_SEED}, {MAX_SEED - (self.n - 1)}] when n is {self.n}")

    def __repr__(self) -> str:
        # Stop strings and stop token ids are the client's words and ids: counted, never shown.
        # So are logit_bias's ids; structured_outputs shows its kind and size only.
        hidden = ("stop", "stop_token_ids", "logit_bias")
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in hidden}
        args = ", ".join(f"{k}={v!r}" for k, v in shown.items())
        bias = None if self.logit_bias is None else f"<{len(self.logit_bias)} ids>"
        return (f"SamplingParams({args}, stop=<{len(self.stop)} strings>, "
                f"stop_token_ids=<{len(self.stop_token_ids)} ids>, logit_bias={bias})")

    __str__ = __repr__


def _token_key(key: object) -> object:
    """A logit_bias key: an int, or a string of digits (JSON object keys are strings)."""
    if isinstance(key, str) and key.isdigit():
        return int(key)
    return key
