"""What a request asks its output to match, named as vLLM names it (`StructuredOutputsParams`).

Exactly one of json, regex, choice, grammar and json_object is set. The spec is the client's
content: a repr shows which kind it is and its size, never the spec itself.
"""
from __future__ import annotations

import json as _json
from dataclasses import dataclass
from typing import Any

from llmserve.errors import InvalidRequestError

MAX_SPEC_CHARS = 1 << 20  # a schema, regex or grammar larger than this is refused before compiling
MAX_CHOICES = 1024


class GrammarError(InvalidRequestError):
    """The schema, regex or grammar cannot be compiled. `str(e)` names only the kind; `detail` holds
    the grammar engine's reason, which may quote the spec: it goes back to the client who sent it
    (the server's 400 message) and never into a log line."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


@dataclass(repr=False)
class StructuredOutputsParams:
    json: str | dict | None = None  # a JSON schema (a dict, or its JSON text)
    regex: str | None = None
    choice: list[str] | None = None  # the output is exactly one of these strings
    grammar: str | None = None  # a Lark grammar (llguidance's syntax) or a GBNF one (llama.cpp's)
    json_object: bool | None = None  # any JSON object (OpenAI's response_format json_object)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            raise InvalidRequestError("structured_outputs needs exactly one of json, regex, choice, grammar and "
                                      f"json_object ({len(given)} given)")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise InvalidRequestError("structured_outputs.json must be a JSON schema (an object or its text)")
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise InvalidRequestError(f"structured_outputs.{name} must be a string")
        if self.choice is not None:
            if (not isinstance(self.choice, list) or not self.choice or len(self.choice) > MAX_CHOICES
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise InvalidRequestError(f"structured_outputs.choice must be 1 to {MAX_CHOICES} non-empty strings")
        if len(self.spec) > MAX_SPEC_CHARS:
            raise InvalidRequestError(f"structured_outputs.{self.kind} must be at most {MAX_SPEC_CHARS} characters")

    @property
    def kind(self) -> str:
        for k in ("json", "regex", "choice", "grammar"):
            if getattr(self, k) is not None:
                return k
        return "json_object"

    @property
    def spec(self) -> str:
        """The spec as one string: with kind, the cache key of its compiled grammar."""
        if self.json is not None:
            return self.json if isinstance(self.json, str) else _json.dumps(self.json)  # key order is property order
        if self.choice is not None:
            return _json.dumps(self.choice)
        if self.json_object:
            return '{"type": "object"}'
        return self.regex if self.regex is not None else self.grammar

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.spec

    @classmethod
    def from_dict(cls, value: StructuredOutputsParams | dict[str, Any] | None) -> StructuredOutputsParams | None:
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise InvalidRequestError("structured_outputs must be a StructuredOutputsParams")
        return cls(**value)

    def __repr__(self) -> str:  # the spec is the client's content: its kind and size only
        return f"StructuredOutputsParams(kind={self.kind}, chars={len(self.spec)})"

    __str__ = __repr__
