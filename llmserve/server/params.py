"""From an OpenAI request to SamplingParams, and the context-length check."""
from __future__ import annotations

import dataclasses

from llmserve.errors import InvalidRequestError
from llmserve.sampling_params import SamplingParams
from llmserve.server.errors import APIError, bad_request
from llmserve.server.protocol import SamplingFields

DEFAULT_TEMPERATURE = 1.0  # OpenAI's default


def sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    if req.logit_bias:
        raise bad_request("logit_bias is not supported.", "logit_bias")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true.", "stream_options")
    try:
        return SamplingParams(
            n=req.n,
            temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k is None else req.top_k,
            min_p=0.0 if req.min_p is None else req.min_p,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            seed=req.seed,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens,
            logprobs=logprobs,
        )
    except InvalidRequestError as e:  # its messages name the parameter and its range only
        raise bad_request(f"{e}.", _param_of(str(e))) from None


def _param_of(message: str) -> str | None:
    """SamplingParams messages start with the field's name ("top_p must be ..."), or mention stop strings."""
    word = message.split(" ", 1)[0]
    if word in _FIELDS:
        return word
    return "stop" if "stop strings" in message else None


_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


def check_context(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int, param: str) -> None:
    """400 when the prompt plus what it asks for cannot fit, in OpenAI's words."""
    if max_tokens is None:
        if num_prompt_tokens >= max_model_len:
            raise _too_long(f"This model's maximum context length is {max_model_len} tokens. However, your "
                            f"{param} resulted in {num_prompt_tokens} tokens, leaving no room for a completion. "
                            f"Please reduce the length of the {param}.", param)
        return
    if num_prompt_tokens + max_tokens > max_model_len:
        raise _too_long(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                        f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {param}, {max_tokens} "
                        f"in the completion). Please reduce the length of the {param} or completion.", param)


def _too_long(message: str, param: str) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code="context_length_exceeded")
