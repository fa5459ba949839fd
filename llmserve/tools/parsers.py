"""Tool-call parsers: model text in, content and tool calls out, whole or as a stream.

A parser knows one output format. `hermes` reads the Hermes/Qwen format that SmolLM2- and
Qwen-style chat templates ask for:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Text outside the tags is content. A tag whose body is not a JSON object with a name is left in
the content as it was (the model did not make a call). Add a format by subclassing ToolParser
and registering it in TOOL_PARSERS.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from llmserve.errors import InvalidRequestError


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(repr=False)
class ParsedCall:
    name: str
    arguments: str  # JSON text, as OpenAI returns it
    id: str = field(default_factory=tool_call_id)

    def __repr__(self) -> str:  # the arguments are output content
        return f"ParsedCall(name_chars={len(self.name)}, arguments_chars={len(self.arguments)})"

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(repr=False)
class ParsedOutput:
    content: str | None
    calls: list[ParsedCall]

    def __repr__(self) -> str:
        return f"ParsedOutput(content_chars={len(self.content or '')}, calls={len(self.calls)})"


class ToolParser:
    """One output format. Subclasses set `start`/`end` tags and `parse_call`."""
    start: str = ""
    end: str = ""

    def parse_call(self, body: str) -> ParsedCall | None:
        raise NotImplementedError

    def extract(self, text: str) -> ParsedOutput:
        """The whole output: content (None when only whitespace is left) and the calls, in order.
        An unclosed last tag (the output was cut) is parsed up to the end of the text."""
        calls: list[ParsedCall] = []
        content: list[str] = []
        pos = 0
        while True:
            i = text.find(self.start, pos)
            if i == -1:
                content.append(text[pos:])
                break
            j = text.find(self.end, i + len(self.start))
            body_end, next_pos = (len(text), len(text)) if j == -1 else (j, j + len(self.end))
            call = self.parse_call(text[i + len(self.start):body_end])
            content.append(text[pos:i])
            if call is None:
                content.append(text[i:next_pos])
            else:
                calls.append(call)
            pos = next_pos
        joined = "".join(content)
        return ParsedOutput(joined if joined.strip() else None, calls)

    def streaming(self) -> StreamingToolParser:
        return StreamingToolParser(self)


class HermesToolParser(ToolParser):
    start = "<tool_call>"
    end = "</tool_call>"

    def parse_call(self, body: str) -> ParsedCall | None:
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        return ParsedCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


TOOL_PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesToolParser}
DEFAULT_TOOL_PARSER = "hermes"


def get_tool_parser(name: str = DEFAULT_TOOL_PARSER) -> ToolParser:
    cls = TOOL_PARSERS.get(name)
    if cls is None:
        raise InvalidRequestError(f"unknown tool parser {name!r}; known: {', '.join(sorted(TOOL_PARSERS))}")
    return cls()


@dataclass(repr=False)
class StreamEvent:
    """What a stream delta turns into: content text, and calls completed by it."""
    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)


class StreamingToolParser:
    """Feeds on text deltas. Content is passed on as it comes, except text that could be the start
    of a tag (held back until it cannot be); a call is emitted whole once its closing tag arrives
    (or at the end, for a cut one). A tag whose body is not a call goes back into the content."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self._buf = ""  # text not yet emitted: a possible tag start, or an open tag's body
        self._in_call = False

    def feed(self, text: str, final: bool = False) -> StreamEvent:
        p = self.parser
        self._buf += text
        event = StreamEvent()
        while True:
            if not self._in_call:
                i = self._buf.find(p.start)
                if i == -1:
                    keep = 0 if final else _partial_suffix(self._buf, p.start)
                    event.content += self._buf[:len(self._buf) - keep]
                    self._buf = self._buf[len(self._buf) - keep:]
                    return event
                event.content += self._buf[:i]
                self._buf = self._buf[i:]
                self._in_call = True
            j = self._buf.find(p.end, len(p.start))
            if j == -1 and not final:
                return event
            end = len(self._buf) if j == -1 else j + len(p.end)
            call = p.parse_call(self._buf[len(p.start):len(self._buf) if j == -1 else j])
            if call is None:
                event.content += self._buf[:end]
            else:
                event.calls.append(call)
            self._buf, self._in_call = self._buf[end:], False
            if not self._buf:
                return event


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of text that is a proper start of tag."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0
