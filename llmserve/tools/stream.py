"""One chat choice's output as OpenAI's streamed deltas when tools are in play.

`delta(text, finished)` takes the text a choice gained and returns the delta to send (possibly
empty): content as it comes, and tool calls in OpenAI's chunk shape, `tool_calls[i]` with its
index, id, type and function name first, then `function.arguments` in pieces.

- auto: content streams; a call is sent whole once its closing tag arrives (the parser's format);
- named: the output is the arguments, streamed as they come under one call;
- required: the output is a JSON array of calls, sent when complete (at the end).
"""
from __future__ import annotations

from typing import Any

from llmserve.tools.choice import ToolChoicePlan
from llmserve.tools.parsers import ParsedCall, ToolParser, tool_call_id


class ChoiceToolStream:
    def __init__(self, plan: ToolChoicePlan, parser: ToolParser) -> None:
        self.plan = plan
        self._parser = parser.streaming() if plan.mode == "auto" else None
        self._num_calls = 0
        self._named_id: str | None = None
        self._text = ""  # required: the whole output, parsed at the end

    def __repr__(self) -> str:
        return f"ChoiceToolStream(mode={self.plan.mode}, calls={self._num_calls})"

    @property
    def made_calls(self) -> bool:
        return self._num_calls > 0

    def delta(self, text: str, finished: bool) -> dict[str, Any]:
        mode = self.plan.mode
        if mode == "named":
            return self._named(text)
        if mode == "required":
            self._text += text
            if not finished:
                return {}
            return self._calls(self.plan.parse_constrained(self._text).calls)
        event = self._parser.feed(text, final=finished)
        out = self._calls(event.calls)
        if event.content:
            out["content"] = event.content
        return out

    def _named(self, text: str) -> dict[str, Any]:
        if self._named_id is None:
            if not text:
                return {}
            self._named_id = tool_call_id()
            self._num_calls = 1
            return {"tool_calls": [{"index": 0, "id": self._named_id, "type": "function",
                                    "function": {"name": self.plan.named, "arguments": text}}]}
        return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if text else {}

    def _calls(self, calls: list[ParsedCall]) -> dict[str, Any]:
        if not self.plan.parallel:
            calls = calls[:max(0, 1 - self._num_calls)]
        if not calls:
            return {}
        deltas = []
        for call in calls:
            deltas.append({"index": self._num_calls, "id": call.id, "type": "function",
                           "function": {"name": call.name, "arguments": call.arguments}})
            self._num_calls += 1
        return {"tool_calls": deltas}
