"""Incremental detokenization and stop strings.

Text is decoded from a sliding window of ids: the delta is emitted only once the window decodes
to something that does not end in an incomplete UTF-8 sequence (U+FFFD), so a multi-byte
character split across tokens never comes out half. Text that could still be the start of a stop
string is held back until it cannot be.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

REPLACEMENT = "\ufffd"


@dataclass(repr=False)
class IncrementalDetokenizer:
    tokenizer: object
    prompt_tail: list[int]  # the last few prompt ids: context for decoding the first output tokens
    stop: list[str]
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    text: str = ""
    stop_string: str | None = None  # the stop string that ended the text, if any
    _ids: list[int] = field(default_factory=list)
    _prefix_offset: int = 0
    _read_offset: int = 0

    def __post_init__(self) -> None:
        self._ids = list(self.prompt_tail)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def __repr__(self) -> str:  # text, stop strings and ids stay out of logs and tracebacks
        return f"IncrementalDetokenizer(text_chars={len(self.text)}, stopped={self.stop_string is not None})"

    def to_state(self) -> dict[str, Any]:
        """Plain data to rebuild this detokenizer elsewhere (the tokenizer is not part of it)."""
        return {"ids": list(self._ids), "prefix_offset": self._prefix_offset, "read_offset": self._read_offset,
                "text": self.text, "stop": list(self.stop), "stop_string": self.stop_string,
                "include_stop_str_in_output": self.include_stop_str_in_output,
                "skip_special_tokens": self.skip_special_tokens}

    @classmethod
    def from_state(cls, state: dict[str, Any], tokenizer: object) -> IncrementalDetokenizer:
        d = cls(tokenizer, [], state["stop"], state["include_stop_str_in_output"], state["skip_special_tokens"])
        d._ids, d._prefix_offset, d._read_offset = list(state["ids"]), state["prefix_offset"], state["read_offset"]
        d.text, d.stop_string = state["text"], state["stop_string"]
        return d

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int, check_stop: bool = True) -> bool:
        """Append one generated token. Returns True if a stop string was found (looked for only
        when check_stop: not before min_tokens, so text is never cut at a stop string that does not stop)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT):
            return False
        old_len = len(self.text)
        self.text += full[len(prefix):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._check_stop(old_len) if check_stop else False

    def _check_stop(self, old_len: int) -> bool:
        if not self.stop:
            return False
        search_from = max(0, old_len - self._hold)
        best = None
        for s in self.stop:
            i = self.text.find(s, search_from)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        self.text = self.text[:i + len(s)] if self.include_stop_str_in_output else self.text[:i]
        self.stop_string = s
        return True

    def visible_text(self, finished: bool) -> str:
        """Text safe to show now: all of it once finished, otherwise without a possible stop prefix."""
        if finished or self._hold == 0:
            return self.text
        held = self._held_back()
        return self.text[:len(self.text) - held] if held else self.text

    def _held_back(self) -> int:
        """Length of the longest end of the text (at most the longest stop string - 1 characters)
        that starts a stop string. Only positions where a stop string's first character occurs are
        tried, longest first, so the usual cost is one find per stop string."""
        text, n, best = self.text, len(self.text), 0
        for s in self.stop:
            i = text.find(s[0], max(0, n - min(len(s), self._hold)))
            while i != -1 and n - i > best:
                if s.startswith(text[i:]):
                    best = n - i
                    break
                i = text.find(s[0], i + 1)
        return best
