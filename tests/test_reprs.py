"""No repr in the server or the async engine shows prompt or output text, token ids or secrets
(issue 9; DESIGN principle 5). Token ids below are chosen so that their digits stand out."""
from __future__ import annotations

import asyncio
import dataclasses
import importlib
import inspect
import pkgutil

import pydantic

import llmserve.server
from llmserve.engine import async_engine
from llmserve.engine.async_engine import RequestStream, _Add
from llmserve.outputs import CompletionOutput, RequestOutput
from llmserve.sampling_params import SamplingParams
from llmserve.server import protocol
from llmserve.server.inputs import Prompt
from llmserve.server.serving import ServerSettings
from llmserve.server.streaming import Delta

CANARY = "CANARY-repr-91c4"
IDS = [31337, 42424, 27182]

# Every dataclass in these modules, and why its repr is safe: a new one must be added here after review.
CONTENT_FREE = {"APIError": "messages name fields and sizes only", "FinishedRequest": "counts and timings",
                "EngineStats": "counts", "EngineHealth": "states and an exception type", "_Abort": "an id",
                "Operation": "an OpenAPI route's summary, model classes and statuses",
                "PrivacyOptions": "operator's paths, issuer public keys, a rotation period",
                "PrivateNode": "a custom repr: whether tokens and a manifest are on, the gateway's key ids"}
REDACTED = {"_Add", "Prompt", "Delta", "ServerSettings"}


def leaks(text: str) -> bool:
    return CANARY in text or any(str(t) in text for t in IDS)


def server_modules():
    yield async_engine
    for info in pkgutil.iter_modules(llmserve.server.__path__):
        yield importlib.import_module(f"llmserve.server.{info.name}")


def test_every_dataclass_is_known():
    found = {name for module in server_modules() for name, obj in vars(module).items()
             if inspect.isclass(obj) and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__}
    assert found == set(CONTENT_FREE) | REDACTED


def test_redacted_dataclasses():
    loop = asyncio.new_event_loop()
    try:
        stream = RequestStream("req-1", loop, lambda rid: None)
        params = SamplingParams(stop=[CANARY], stop_token_ids=IDS)
        add = _Add(stream, IDS, params, f"prompt {CANARY}", 0, f"salt {CANARY}", 0.0)
        for obj in (add, params, Prompt(IDS), Delta(f"text {CANARY}", IDS, [{t: (-1.0, 1)} for t in IDS], 0, False),
                    ServerSettings(api_key=CANARY)):
            assert not leaks(repr(obj)) and not leaks(str(obj)), type(obj).__name__
        assert "req-1" in repr(add) and "prompt_tokens=3" in repr(add)
    finally:
        loop.close()


def test_protocol_models_show_no_content():
    request = protocol.CompletionRequest.model_validate({"prompt": f"hi {CANARY}", "stop": [CANARY], "n": 2})
    chat = protocol.ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": CANARY}]})
    detok = protocol.DetokenizeRequest.model_validate({"tokens": IDS})
    response = protocol.CompletionResponse(id="cmpl-1", model="m", choices=[
        protocol.CompletionChoice(index=0, text=CANARY, logprobs=protocol.CompletionLogprobs(tokens=[CANARY]))])
    tokenized = protocol.TokenizeResponse(count=3, max_model_len=8, tokens=IDS)
    for model in (request, chat, chat.messages[0], detok, response, response.choices[0], tokenized):
        assert not leaks(repr(model)) and not leaks(str(model)), type(model).__name__
    assert "n=2" in repr(request) and request.prompt == f"hi {CANARY}"  # the data itself is untouched
    models = [obj for obj in vars(protocol).values()
              if inspect.isclass(obj) and issubclass(obj, pydantic.BaseModel) and obj.__module__ == protocol.__name__]
    assert all(issubclass(m, protocol._Model) for m in models)


def test_outputs_in_a_stream_stay_out_of_its_repr():
    out = RequestOutput("r", CANARY, IDS, [CompletionOutput(0, CANARY, IDS)], False)
    assert not leaks(repr(out))
