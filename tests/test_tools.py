"""Tools (issue 11): the Hermes/Qwen tool-call parser (whole and streamed), tool_choice plans, and
the server with the official `openai` client on a tiny random model whose chat template supports
tools. A random model does not choose to call tools, so `auto` outputs are steered into the
model's tool-call format with a regex (structured outputs); `required` and named choices are
enforced by the grammar built from the tools' parameters."""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from server_fixtures import make_tiny_model, start_server, tiny_model_path

from llmserve.server.protocol import ChatMessage
from llmserve.tokenizer import apply_chat_template, load_tokenizer, template_supports_tools
from llmserve.tools import get_tool_parser, plan_tool_choice
from llmserve.tools.parsers import ParsedCall

TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou can call these tools:\n<tools>\n"
    "{%- for t in tools %}{{ t | tojson }}\n{% endfor %}</tools><|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{%- for c in m.tool_calls %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                                     "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                                  "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MSG = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL_REGEX = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", "unit": "c"\}\}\n</tool_call>'


# ---- the parser -------------------------------------------------------------------------------
def test_hermes_extracts_calls_and_content():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "add", "parameters": {"a": 1, "b": 2}}</tool_call>')
    out = get_tool_parser("hermes").extract(text)
    assert out.content == "Let me check.\n\n"
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == [
        ("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    assert all(c.id.startswith("call_") for c in out.calls) and len({c.id for c in out.calls}) == 2


@pytest.mark.parametrize(("text", "content", "calls"), [
    ("no calls here", "no calls here", []),
    ("<tool_call>not json</tool_call> after", "<tool_call>not json</tool_call> after", []),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    ('<tool_call>{"name": "f", "arguments": {"x": [1]}}', None, [("f", {"x": [1]})]),  # cut: parsed to the end
    ('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>  ', None, [("f", {"x": 1})]),
])
def test_hermes_edge_cases(text, content, calls):
    out = get_tool_parser().extract(text)
    assert out.content == content
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == calls


@pytest.mark.parametrize("text", [
    'Sure. <tool_call>\n{"name": "a", "arguments": {"q": "<tool"}}\n</tool_call> and <tool_call>{"name": "b"}</tool_call>',
    "a < b <tool_ and <tool_call>broken</tool_call> <",
    '<tool_call>{"name": "x", "arguments": {}}',
])
@pytest.mark.parametrize("step", [1, 3, 7])
def test_streaming_parser_agrees_with_the_whole_text(text, step):
    parser = get_tool_parser()
    whole = parser.extract(text)
    stream = parser.streaming()
    content, calls = "", []
    pieces = [text[i:i + step] for i in range(0, len(text), step)]
    for i, piece in enumerate(pieces):
        event = stream.feed(piece, final=i == len(pieces) - 1)
        content += event.content
        calls += event.calls
    assert (content if content.strip() else None) == whole.content
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole.calls]


def test_plans():
    tools = TOOLS
    required = plan_tool_choice(tools, "required", None)
    schema = json.loads(required.grammar.spec)
    jsonschema.validate([{"name": "add", "parameters": {"a": 1, "b": 2}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "add", "parameters": {"city": "Paris", "unit": "c"}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], schema)
    single = json.loads(plan_tool_choice(tools, "required", False).grammar.spec)
    assert single["maxItems"] == 1
    named = plan_tool_choice(tools, {"type": "function", "function": {"name": "add"}}, None)
    assert json.loads(named.grammar.spec) == PARAMS["add"] and named.named == "add"
    assert plan_tool_choice(tools, None, None).mode == "auto" and plan_tool_choice(tools, "none", None).grammar is None
    with pytest.raises(KeyError):
        plan_tool_choice(tools, {"type": "function", "function": {"name": "nope"}}, None)
    assert "get_weather" not in repr(ParsedCall("get_weather", '{"city": "Paris"}'))


# ---- templates --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("tools") / "tiny-tools", max_position_embeddings=2048)
    (folder / "chat_template.jinja").write_text(TOOL_TEMPLATE)  # the tools' JSON is long in a tiny vocabulary
    return folder


def test_tool_support_is_detected_and_history_goes_through_the_template(tool_model):
    tok, plain = load_tokenizer(tool_model), load_tokenizer(tiny_model_path())
    assert template_supports_tools(tok) and not template_supports_tools(plain)
    history = [ChatMessage.model_validate(m) for m in [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]]
    text = tok.decode(apply_chat_template(tok, [m.template_dict() for m in history], tools=TOOLS))
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in text
    assert '"name": "add"' in text and text.endswith("<|im_start|>assistant\n")


# ---- the server ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tool_model):
    srv = start_server(tool_model, num_kv_blocks=512)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def plain_server():
    srv = start_server(tiny_model_path(), num_kv_blocks=128)
    yield srv
    srv.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=60)


def chat(client, stream=False, **kw):
    kw = {"model": "tiny", "messages": MSG, "tools": TOOLS, "temperature": 0, "max_tokens": 120} | kw
    return client.chat.completions.create(stream=stream, **kw)


def streamed_calls(stream) -> tuple[str, list[dict], str | None]:
    """Reassemble OpenAI tool-call deltas: the first delta of an index brings id, type and name,
    later ones append to the arguments."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            d = choice.delta
            content += d.content or ""
            for tc in d.tool_calls or []:
                if tc.index not in calls:
                    assert tc.id and tc.type == "function" and tc.function.name
                    calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
                calls[tc.index]["arguments"] += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_auto_parses_the_models_tool_call(client):
    r = chat(client, extra_body={"guided_regex": CALL_REGEX})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, PARAMS["get_weather"])
    content, calls, finish = streamed_calls(chat(client, stream=True, extra_body={"guided_regex": CALL_REGEX}))
    assert (content, finish) == ("", "tool_calls")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", args)]


def test_auto_with_content_before_the_call(client):
    regex = "Let me see[.] " + CALL_REGEX
    r = chat(client, extra_body={"guided_regex": regex})
    assert r.choices[0].message.content == "Let me see. " and len(r.choices[0].message.tool_calls) == 1
    content, calls, _ = streamed_calls(chat(client, stream=True, extra_body={"guided_regex": regex}))
    assert content == "Let me see. " and len(calls) == 1


def test_auto_without_a_call_is_plain_content(client):
    r = chat(client, max_tokens=8, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content


def test_none_parses_no_call(client):
    r = chat(client, tool_choice="none", extra_body={"guided_regex": CALL_REGEX})
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content.startswith("<tool_call>")


@pytest.mark.parametrize("parallel", [None, False])
def test_required_calls_follow_the_tools_schemas(client, parallel):
    kw = {"tool_choice": "required", "temperature": 1.0, "seed": 4, "n": 3, "max_tokens": 600}
    if parallel is not None:
        kw["parallel_tool_calls"] = parallel
    r = chat(client, **kw)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls", choice.finish_reason
        calls = choice.message.tool_calls
        assert calls and (parallel is None or len(calls) == 1)
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])
    content, calls, finish = streamed_calls(chat(client, stream=True, **(kw | {"n": 1})))
    assert finish == "tool_calls" and calls and not content
    for call in calls:
        jsonschema.validate(json.loads(call["arguments"]), PARAMS[call["name"]])


def test_named_function_is_enforced_and_streamed_in_pieces(client):
    choice = {"type": "function", "function": {"name": "add"}}
    r = chat(client, tool_choice=choice)
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "add" and r.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), PARAMS["add"])
    stream = list(chat(client, stream=True, tool_choice=choice))
    pieces = [tc for ch in stream for c in ch.choices for tc in (c.delta.tool_calls or [])]
    assert len(pieces) > 1 and all(p.index == 0 for p in pieces) and pieces[0].function.name == "add"
    assert all(p.id is None and p.function.name is None for p in pieces[1:])
    assert "".join(p.function.arguments for p in pieces) == call.function.arguments


def test_history_with_tool_messages_is_served(client):
    msgs = MSG + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, max_tokens=3, temperature=0)
    assert r.choices[0].message.content is not None


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
])
def test_bad_tool_requests_are_400(server, body, param):
    r = httpx.post(server.base_url + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 2, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_a_template_without_tools_refuses_them(plain_server):
    url = plain_server.base_url + "/v1/chat/completions"
    r = httpx.post(url, json={"messages": MSG, "tools": TOOLS, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    history = MSG + [{"role": "tool", "tool_call_id": "c", "content": "x"}]
    r = httpx.post(url, json={"messages": history, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    # tool_choice none asks for no call: served without showing the tools.
    assert httpx.post(url, json={"messages": MSG, "tools": TOOLS, "tool_choice": "none", "max_tokens": 2}).status_code == 200


def test_offline_chat_with_tools(tool_model):
    from tiny_models import make_llm

    from llmserve.errors import InvalidRequestError
    from llmserve.sampling_params import SamplingParams

    llm = make_llm(tool_model)
    params = SamplingParams(temperature=0, max_tokens=80, structured_outputs={"regex": CALL_REGEX})
    [out] = llm.chat(MSG, params, tools=TOOLS, use_tqdm=False)
    [call] = get_tool_parser().extract(out.outputs[0].text).calls
    assert call.name == "get_weather"
    with pytest.raises(InvalidRequestError, match="tools"):
        make_llm(tiny_model_path()).chat(MSG, params, tools=TOOLS, use_tqdm=False)
