"""What every endpoint shares: the engine, settings, metrics, tokenization, and starting requests."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from llmserve.engine.async_engine import AsyncLLMEngine
from llmserve.outputs import RequestOutput
from llmserve.sampling_params import SamplingParams
from llmserve.server.errors import APIError, bad_request, from_engine_error, from_validation_error
from llmserve.server.inputs import Prompt, Tokenization
from llmserve.server.metrics import ServerMetrics
from llmserve.server.protocol import Usage
from llmserve.server.tracking import TrackedRequest

MAX_BODY_BYTES = 16 << 20
M = TypeVar("M", bound=BaseModel)


@dataclass(repr=False)
class ServerSettings:
    served_model_names: list[str] = field(default_factory=list)  # empty: the engine's model name
    api_key: str | None = None
    health_stall_s: float = 60.0  # /health fails when the engine loop has not come round for this long
    allowed_origins: list[str] = field(default_factory=list)  # CORS: web origins that may call the API
    # Private mode (server/private.py): priorities are ignored (first come, first served); the
    # engine, built with a private config, isolates salt-less requests' prefixes.
    private: bool = False

    def __repr__(self) -> str:  # the API key is a secret: whether one is set, never its value
        return (f"ServerSettings(served_model_names={self.served_model_names!r}, "
                f"api_key={'<set>' if self.api_key else None}, health_stall_s={self.health_stall_s!r}, "
                f"allowed_origins={self.allowed_origins!r}, private={self.private!r})")


class ServingContext:
    def __init__(self, engine: AsyncLLMEngine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.model_names = list(settings.served_model_names) or [engine.model_name]
        self.model_name = self.model_names[0]
        self.metrics = ServerMetrics(engine, self.model_name)
        self.tokenization = Tokenization(engine.tokenizer, engine.vocab_size, engine.max_model_len)
        self.draining = False  # set when shutdown begins: /ready turns 503

    def check_model(self, model: str | None) -> str:
        if model is not None and model not in self.model_names:
            raise APIError(404, "The model does not exist; GET /v1/models lists the served models.",
                           "not_found_error", "model", "model_not_found")
        return self.model_name

    async def start(self, request_id: str, prompts: list[Prompt], params: SamplingParams, *,
                    cache_salt: str | None, priority: int, arrival_time: float) -> list[TrackedRequest]:
        """Submit every prompt at once, then wait for all admissions; if any is refused, the rest are
        withdrawn and the refusal is raised (as an APIError)."""
        self._check_fits(len(prompts), params.n)
        if self.settings.private:
            priority = 0  # a salt-less request gets a random salt of its own in the engine (kv_cache.py)
        ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        results = await asyncio.gather(
            *(self.engine.add_request(rid, p.token_ids, params, cache_salt=cache_salt, priority=priority,
                                      arrival_time=arrival_time) for rid, p in zip(ids, prompts)),
            return_exceptions=True)
        tracked = [TrackedRequest(r, self.metrics, arrival_time, len(p.token_ids))
                   for r, p in zip(results, prompts) if not isinstance(r, BaseException)]
        error = next((r for r in results if isinstance(r, BaseException)), None)
        if error is not None:
            for t in tracked:
                t.withdraw(params.n)
            if isinstance(error, asyncio.CancelledError):
                raise error
            raise from_engine_error(error) from None
        return tracked

    def _check_fits(self, num_prompts: int, n: int) -> None:
        """A request with more sequences than may wait at once would be refused (429) even by an
        idle server, and a retry would not help: that is a 400."""
        bound = self.engine.max_waiting_requests
        if num_prompts * n > bound:
            raise bad_request(f"This request asks for {num_prompts * n} sequences ({num_prompts} prompts x n={n}), "
                              f"more than the {bound} this server queues at once, so it can never be admitted. "
                              "Send fewer prompts or a smaller n per request.", "n" if num_prompts == 1 else "prompt")


async def read_json(request: Request, model: type[M]) -> M:
    """The body, size-capped, validated in strict JSON mode against model."""
    size, chunks = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"The request body exceeds {MAX_BODY_BYTES} bytes.", "invalid_request_error")
        chunks.append(chunk)
    try:
        return model.model_validate_json(b"".join(chunks))
    except ValidationError as e:
        raise from_validation_error(e) from None


def usage(outputs: list[RequestOutput]) -> Usage:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outputs)
    policy = next((o.kv_policy for o in outputs if o.kv_policy is not None), None)
    details = None if policy is None else {"policy": policy,
                                           "evicted_tokens": sum(o.num_evicted_tokens for o in outputs)}
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details={"cached_tokens": cached}, kv_policy_details=details)
