"""Compiling structured-output specs into llguidance matchers, cached by (kind, spec).

Compiling is the slow part (a large schema takes milliseconds to seconds); a matcher for a new
sequence is a deep copy of the cached, freshly compiled one. The compiler is thread-safe: the
server compiles on a worker thread before it submits a request, so the engine's loop thread
only finds the result in the cache (or, offline, compiles on the caller's thread).

The llguidance tokenizer is built from the HF tokenizer's JSON. That JSON is captured on the
thread that owns the HF tokenizer (`prepare()`, which the async engine calls on its loop thread
at start; offline, the first compile does it), so later compiles on other threads never touch the
(not thread-safe) HF tokenizer.
"""
from __future__ import annotations

import copy
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence

from llmserve.structured.params import GrammarError, StructuredOutputsParams

logger = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = 256
JSON_DEFAULTS = {"whitespace_flexible": False}  # separators ", " and ": ", no other whitespace


class GrammarCompiler:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int],
                 cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.cache_size = cache_size
        self._hf_tokenizer = tokenizer
        self._tokenizer_json: str | None = None
        self._ll_tokenizer = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], object] = OrderedDict()
        self.num_compiled = 0  # cache misses, for tests and metrics

    def __repr__(self) -> str:
        return f"GrammarCompiler(vocab_size={self.vocab_size}, cached={len(self._cache)})"

    def prepare(self) -> None:
        """Capture the HF tokenizer's JSON now; call it on the thread that owns that tokenizer."""
        with self._lock:
            if self._hf_tokenizer is not None:
                self._tokenizer_json = _tokenizer_json(self._hf_tokenizer)
                self._hf_tokenizer = None

    def _tokenizer(self):
        import llguidance

        self.prepare()
        with self._lock:
            if self._ll_tokenizer is None:
                if self._tokenizer_json is None:
                    raise GrammarError("structured outputs need a fast (tokenizers-backed) tokenizer")
                self._ll_tokenizer = llguidance.LLTokenizer(
                    self._tokenizer_json, n_vocab=self.vocab_size,
                    eos_token=list(self.eos_token_ids) if self.eos_token_ids else None)
                self._tokenizer_json = None  # a megabyte or more: not needed any more
            return self._ll_tokenizer

    def compile(self, so: StructuredOutputsParams):
        """The compiled matcher for so, from the cache or compiled now. Raises GrammarError."""
        key = so.key
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        matcher = self._compile(so)
        with self._lock:
            self._cache[key] = matcher
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            self.num_compiled += 1
        return matcher

    def _compile(self, so: StructuredOutputsParams):
        import llguidance

        tokenizer = self._tokenizer()
        kind = so.kind
        try:
            if kind in ("json", "json_object"):
                # Compact JSON by default: flexible whitespace lets a model pad forever with
                # newlines (vLLM's disable_any_whitespace exists for that). A schema's own
                # "x-guidance" options (e.g. {"whitespace_flexible": true}) override it.
                grammar = llguidance.LLMatcher.grammar_from_json_schema(so.spec, defaults=JSON_DEFAULTS)
            else:
                grammar = llguidance.grammar_from(_FORMATS[kind], so.spec)
            error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
            matcher = None if error else llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        except Exception as e:  # noqa: BLE001 - whatever the client's spec makes the engine raise is a 400
            raise GrammarError(f"the structured_outputs {kind} is invalid", str(e) or type(e).__name__) from None
        if matcher is not None and matcher.is_error():
            error = matcher.get_error()
        if error:
            raise GrammarError(f"the structured_outputs {kind} is invalid", error)
        return matcher

    def state(self, so: StructuredOutputsParams, replay: Sequence[int] = ()) -> GrammarState:
        """A fresh matcher for one sequence, advanced over replay (tokens it already produced)."""
        state = GrammarState(self.compile(so).deep_copy())
        if replay and not state.matcher.consume_tokens(list(replay)):
            raise GrammarError("the request's output does not match its structured_outputs spec")
        return state


_FORMATS = {"json": "json", "json_object": "json", "regex": "regex", "choice": "choice", "grammar": "grammar"}


def _tokenizer_json(tokenizer) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    backend = copy.copy(backend)  # padding and truncation settings must not leak into the copy's JSON
    backend.no_padding()
    backend.no_truncation()
    return backend.to_str()


class GrammarState:
    """One sequence's matcher. `advance` is called at the update point for every accepted token."""

    def __init__(self, matcher) -> None:
        self.matcher = matcher
        self.rejected = False  # a token the grammar did not allow was appended (it should never be)

    def __repr__(self) -> str:
        return f"GrammarState(stopped={self.matcher.is_stopped()}, rejected={self.rejected})"

    def advance(self, token_id: int) -> bool:
        """Consume token_id; True when the sequence must end here: the grammar is complete and
        allows nothing more, or the token broke it."""
        if not self.matcher.consume_token(token_id):
            if not self.rejected:
                logger.warning("a sequence produced a token its grammar does not allow; it ends here")
            self.rejected = True
            return True
        return self.matcher.is_stopped()

    @property
    def finished(self) -> bool:
        return self.rejected or self.matcher.is_stopped()


