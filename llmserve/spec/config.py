"""SpeculativeConfig: which proposer drafts tokens and how many, in vLLM's shape.

Given as a dict or a JSON string (`--speculative-config '{"method": "ngram", ...}'` or
`LLM(speculative_config={...})`) and validated once, when the EngineConfig is built: a bad field
is an InvalidRequestError that names it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from llmserve.errors import InvalidRequestError

METHODS = ("ngram", "draft_model", "self_quantized", "self_early_exit")
SELF_QUANTIZATIONS = ("q8_0", "q4_1")
MAX_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int = 4
    model: str | None = None  # draft_model: an HF folder of the same vocabulary
    prompt_lookup_max: int = 4  # ngram: the longest suffix looked up in the request's own tokens
    prompt_lookup_min: int = 2  # ngram: the shortest
    quantization: str = "q8_0"  # self_quantized: the block format of the draft's weights
    num_layers: int | None = None  # self_early_exit: the target's first L layers (default: a quarter)
    # Load backoff: the step speculates only while its decodes plus draft tokens stay within this
    # many tokens (past it verification costs more than it saves). None: 32 on CPU, 256 on CUDA.
    max_batch_tokens: int | None = None
    adaptive: bool = True  # per-request draft length from its recent acceptance

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict | str | None) -> SpeculativeConfig | None:
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise InvalidRequestError(f"speculative_config is not valid JSON (at character {e.pos})") from None
        if not isinstance(value, dict):
            raise InvalidRequestError("speculative_config must be a JSON object (a dict)")
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in value if k not in known)
        if unknown:
            raise InvalidRequestError(f"speculative_config has unknown field(s) {unknown}; known: {sorted(known)}")
        if "method" not in value:
            raise InvalidRequestError(f"speculative_config needs a method, one of {METHODS}")
        return cls(**value)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidRequestError(f"speculative_config method must be one of {METHODS}, not {self.method!r}")
        _int_in("num_speculative_tokens", self.num_speculative_tokens, 1, MAX_SPECULATIVE_TOKENS)
        _int_in("prompt_lookup_min", self.prompt_lookup_min, 1, 64)
        _int_in("prompt_lookup_max", self.prompt_lookup_max, self.prompt_lookup_min, 64)
        if self.method == "draft_model" and not (isinstance(self.model, str) and self.model):
            raise InvalidRequestError("speculative_config method draft_model needs a model (an HF folder)")
        if self.method != "draft_model" and self.model is not None:
            raise InvalidRequestError(f"speculative_config model applies to method draft_model, not {self.method}")
        if self.quantization not in SELF_QUANTIZATIONS:
            raise InvalidRequestError(f"speculative_config quantization must be one of {SELF_QUANTIZATIONS}")
        if self.num_layers is not None:
            _int_in("num_layers", self.num_layers, 1, 1 << 16)
        if self.max_batch_tokens is not None:
            _int_in("max_batch_tokens", self.max_batch_tokens, 0, 1 << 20)
        if not isinstance(self.adaptive, bool):
            raise InvalidRequestError("speculative_config adaptive must be true or false")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _int_in(name: str, value: Any, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidRequestError(f"speculative_config {name} must be an integer in [{low}, {high}]")
