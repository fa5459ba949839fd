"""From an OpenAI request to SamplingParams, and the context-length check.

Every field of a request is honoured here or refused with a 400 naming it: the fields the server
knows but does not implement are listed in UNSUPPORTED with the values that ask for nothing.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from llmserve.errors import InvalidRequestError
from llmserve.sampling_params import SamplingParams
from llmserve.server.errors import APIError, bad_request
from llmserve.server.protocol import SamplingFields
from llmserve.structured import GrammarError, StructuredOutputsParams

DEFAULT_TEMPERATURE = 1.0  # OpenAI's default

# Known fields llmserve does not implement -> the values that ask for nothing (accepted).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "suffix": (None,), "guided_decoding_backend": (None,), "guided_whitespace_pattern": (None,),
    "use_beam_search": (None, False), "prompt_logprobs": (None,), "allowed_token_ids": (None,),
    "bad_words": (None, []), "truncate_prompt_tokens": (None,), "service_tier": (None, "auto", "default"),
    "store": (None, False), "metadata": (None,), "modalities": (None, ["text"]), "audio": (None,),
    "prediction": (None,), "functions": (None,), "function_call": (None,), "web_search_options": (None,),
    "reasoning_effort": (None,), "verbosity": (None,), "chat_template": (None,), "chat_template_kwargs": (None,),
    "documents": (None,),
}


def check_supported(req: SamplingFields) -> None:
    for name, accepted in UNSUPPORTED.items():
        if name in type(req).model_fields and getattr(req, name) not in accepted:
            raise bad_request(f"{name} is not supported by this server.", name)


def structured_outputs(req: SamplingFields) -> tuple[StructuredOutputsParams | None, str | None]:
    """The request's output constraint, from whichever one field asks for it, and that field's name."""
    found: list[tuple[str, dict[str, Any]]] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", {"json_object": True}))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None:
            raise bad_request("response_format json_schema needs a json_schema object.", "response_format")
        # OpenAI: a json_schema without a schema allows any JSON object.
        schema = rf.json_schema.schema_
        found.append(("response_format", {"json": schema} if schema is not None else {"json_object": True}))
    if req.structured_outputs is not None:
        so = req.structured_outputs
        given = {k: v for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                   ("grammar", so.grammar), ("json_object", so.json_object or None)) if v is not None}
        found.append(("structured_outputs", given))
    for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        value = getattr(req, name)
        if value is not None:
            found.append((name, {name.removeprefix("guided_"): value}))
    if not found:
        return None, None
    if len(found) > 1:
        raise bad_request(f"give at most one of response_format, structured_outputs and guided_*; got "
                          f"{', '.join(n for n, _ in found)}.", found[1][0])
    param, fields = found[0]
    try:
        return StructuredOutputsParams(**fields), param
    except InvalidRequestError as e:
        raise bad_request(f"{e}.", param) from None


def logit_bias(req: SamplingFields) -> dict[int, float] | None:
    if not req.logit_bias:
        return None
    if not all(k.isdigit() for k in req.logit_bias):
        raise bad_request("logit_bias keys must be token ids (strings of digits).", "logit_bias")
    return {int(k): v for k, v in req.logit_bias.items()}


def sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None,
                    so: StructuredOutputsParams | None = None) -> SamplingParams:
    """so: the output constraint, when the caller resolved it (tools, or structured_outputs(req))."""
    check_supported(req)
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
            logit_bias=logit_bias(req),
            structured_outputs=so,
            kv_policy=req.kv_policy,
            kv_budget=req.kv_budget,
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


def check_context(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int, param: str,
                  min_tokens: int = 0) -> None:
    """400 when the prompt plus what it asks for (max_tokens, or at least min_tokens) cannot fit, in
    OpenAI's words."""
    if min_tokens and num_prompt_tokens + min_tokens > max_model_len:
        raise _too_long(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                        f"at least {num_prompt_tokens + min_tokens} tokens ({num_prompt_tokens} in the {param}, "
                        f"min_tokens {min_tokens} in the completion). Please reduce the length of the {param} "
                        "or min_tokens.", "min_tokens")
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


async def compile_grammar(ctx, so: StructuredOutputsParams, param: str | None) -> None:
    """Compile so off the engine's loop thread (cached by spec): a spec that does not compile is a
    400 that says why, sent to the client who wrote the spec and never logged."""
    try:
        await ctx.engine.compile_grammar(so)
    except GrammarError as e:
        raise bad_request(f"Invalid {param}: {e}" + (f": {e.detail}" if e.detail else "") + ".", param) from None
