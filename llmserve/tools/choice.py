"""tool_choice as a plan: whether tools go into the prompt, which grammar (if any) the output must
follow, and how the output becomes tool calls.

As in vLLM: `auto` lets the model choose and its text is parsed by the tool parser; `none`
renders the tools but parses no call; `required` constrains the output to a JSON array of one or
more `{"name", "parameters"}` calls, one of the given tools each (one at most when
parallel_tool_calls is false); a named function constrains the output to that function's
arguments (a JSON object following its parameters schema).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from llmserve.structured import StructuredOutputsParams
from llmserve.tools.parsers import ParsedCall, ParsedOutput

ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(repr=False)
class ToolChoicePlan:
    mode: str  # "none" | "auto" | "required" | "named"
    tools: list[dict[str, Any]]  # OpenAI tool objects, as the chat template gets them
    named: str | None = None
    parallel: bool = True
    grammar: StructuredOutputsParams | None = None

    def __repr__(self) -> str:
        return f"ToolChoicePlan(mode={self.mode}, tools={len(self.tools)}, parallel={self.parallel})"

    def parse_constrained(self, text: str) -> ParsedOutput:
        """The output of a required or named choice (JSON that its grammar enforced) as calls."""
        if self.mode == "named":
            return ParsedOutput(None, [ParsedCall(self.named, text.strip())])
        try:
            items = json.loads(text)
        except ValueError:  # cut by max_tokens: no complete call to report
            return ParsedOutput(text or None, [])
        calls = [ParsedCall(it["name"], json.dumps(it.get("parameters", {}), ensure_ascii=False)) for it in items]
        return ParsedOutput(None, calls)


def plan_tool_choice(tools: list[dict[str, Any]], tool_choice: str | dict[str, Any] | None,
                     parallel_tool_calls: bool | None) -> ToolChoicePlan:
    """tools: OpenAI tool objects. tool_choice: "none" | "auto" | "required" | {"type": "function",
    "function": {"name": ...}}, None meaning auto (OpenAI's default when tools are given)."""
    parallel = parallel_tool_calls is not False
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    if tool_choice is None or tool_choice in ("auto", "none"):
        return ToolChoicePlan(tool_choice or "auto", tools, parallel=parallel)
    if tool_choice == "required":
        items = [{"type": "object",
                  "properties": {"name": {"type": "string", "enum": [name]},
                                 "parameters": f.get("parameters") or ANY_OBJECT},
                  "required": ["name", "parameters"], "additionalProperties": False} for name, f in by_name.items()]
        schema: dict[str, Any] = {"type": "array", "minItems": 1,
                                  "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if not parallel:
            schema["maxItems"] = 1
        return ToolChoicePlan("required", tools, parallel=parallel, grammar=StructuredOutputsParams(json=schema))
    name = tool_choice["function"]["name"]
    if name not in by_name:
        raise KeyError(name)
    params = by_name[name].get("parameters") or ANY_OBJECT
    return ToolChoicePlan("named", tools, named=name, parallel=parallel,
                          grammar=StructuredOutputsParams(json=params))
