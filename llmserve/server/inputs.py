"""Prompts to token ids, token ids to text, off the event loop.

The tokenizer is not thread-safe, so each worker thread has its own copy (the server's copy,
AsyncLLMEngine.tokenizer, and a clone of it), never the engine loop thread's. Work runs in two
lanes of one thread each: short work (the common case, and every decode of outputs) on one, long
texts on the other, so a long prompt never makes a short request wait behind it.

Text is bounded before it is tokenized: a text longer than the context times the most characters
one token can cover cannot fit, and is refused at once instead of after seconds of tokenizing.
"""
from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from llmserve.outputs import PositionLogprobs
from llmserve.server.errors import APIError, bad_request
from llmserve.server.logprobs import chat_logprobs, completion_logprobs
from llmserve.server.protocol import ChatLogprobs, ChatMessage, CompletionLogprobs
from llmserve.tokenizer import apply_chat_template, clone_tokenizer

MAX_BATCH_PROMPTS = 64  # prompts in one completions request
LONG_TEXT_CHARS = 4096  # longer texts go to the long lane (a few ms of tokenizing and up)
LONG_TOKEN_IDS = 4096  # /detokenize calls with more ids go to the long lane
# Text a tokenizer may drop or merge would break the bound (a pre-tokenizer that discards
# whitespace, a normalizer that composes "e" + U+0301, WordPiece's one [UNK] for a whole word):
# each is probed once at start.
_PROBES = (" ", "\t", "\n", "\r", "\x0b", "\x0c", "\x00", "\x7f", "\u00a0", "\u200b", "\u3000", "\u0301",
           "e\u0301", "a", "\u00e9", "\u65e5", "\U0001f600")
_PROBE_REPEAT = 64


@dataclass(frozen=True, repr=False)
class Prompt:
    token_ids: list[int]

    def __repr__(self) -> str:  # ids stay out of logs and tracebacks
        return f"Prompt(num_tokens={len(self.token_ids)})"


def longest_token_chars(tokenizer) -> int:
    """The most input characters one token can stand for: the length of its vocabulary string. A
    byte-level BPE string has one character per byte (an input character is 1-4 bytes); a
    SentencePiece one has one per character ('▁' for a space; a byte-fallback token '<0xAB>' is
    longer than the one byte it covers). Special tokens count with their full text."""
    return max(map(len, tokenizer.get_vocab()), default=1)


def max_text_chars(tokenizer, max_model_len: int) -> int | None:
    """The longest text that could still fit in the context, or None where the bound does not
    hold: a text of c characters is at least c / L tokens only if every character is covered by
    some token, which the probe checks for the characters tokenizers are known to drop or merge."""
    per_token = longest_token_chars(tokenizer)
    for probe in _PROBES:
        n = len(tokenizer.encode(probe * _PROBE_REPEAT, add_special_tokens=False))
        if n * per_token < _PROBE_REPEAT * len(probe):
            return None
    return max_model_len * per_token


class Tokenization:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int) -> None:
        self._tokenizer = tokenizer  # the short lane's, used on its thread only
        self._long_tokenizer = clone_tokenizer(tokenizer)  # the long lane's
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_chars = max_text_chars(tokenizer, max_model_len)
        self.long_text_chars = LONG_TEXT_CHARS
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmserve-tokenize")
        self._long_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmserve-tokenize-long")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _run_long(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._long_pool, fn, *args)

    def check_size(self, num_chars: int, param: str) -> None:
        """400 (context_length_exceeded) for text too long to fit in any case, before tokenizing it."""
        if self.max_chars is not None and num_chars > self.max_chars:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                           f"{param} has {num_chars} characters, more than {self.max_model_len} tokens can hold. "
                           f"Please reduce the length of the {param}.", "invalid_request_error", param,
                           code="context_length_exceeded")

    async def encode(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        self.check_size(len(text), param)
        if len(text) > self.long_text_chars:
            return await self._run_long(lambda: self._long_tokenizer.encode(text, add_special_tokens=add_special_tokens))
        return await self._run(lambda: self._tokenizer.encode(text, add_special_tokens=add_special_tokens))

    async def completion_prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[Prompt]:
        """One Prompt per entry of the batch; token ids are passed through (the engine checks their range)."""
        if isinstance(prompt, str):
            return [Prompt(await self.encode(prompt))]
        if not prompt:
            raise bad_request("prompt must not be empty.", "prompt")
        if isinstance(prompt[0], int):
            return [Prompt(list(prompt))]
        if len(prompt) > MAX_BATCH_PROMPTS:
            raise bad_request(f"at most {MAX_BATCH_PROMPTS} prompts are allowed in one request.", "prompt")
        if isinstance(prompt[0], str):
            for p in prompt:  # all of them before any is tokenized
                self.check_size(len(p), "prompt")
            return [Prompt(await self.encode(p)) for p in prompt]
        return [Prompt(list(p)) for p in prompt]

    async def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool, **template_kwargs) -> Prompt:
        """template_kwargs: tools and split_special_tokens, passed on to apply_chat_template."""
        # The template writes every message's text into the prompt, so their sum bounds it from below.
        num_chars = sum(len(m.text()) for m in messages)
        self.check_size(num_chars, "messages")
        conversation = [m.template_dict() for m in messages]
        render = functools.partial(apply_chat_template, add_generation_prompt=add_generation_prompt, **template_kwargs)
        if num_chars > self.long_text_chars:
            ids = await self._run_long(render, self._long_tokenizer, conversation)
        else:
            ids = await self._run(render, self._tokenizer, conversation)
        return Prompt(ids)

    async def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        if token_ids and (min(token_ids) < 0 or max(token_ids) >= self.vocab_size):  # C loops: a long list is quick
            raise bad_request(f"token ids must be integers in [0, {self.vocab_size}).", "tokens")
        if len(token_ids) > LONG_TOKEN_IDS:
            return await self._run_long(
                lambda: self._long_tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens))
        return await self._run(lambda: self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens))

    async def completion_logprobs(self, token_ids: list[int], positions: list[PositionLogprobs], k: int,
                                  text_offset: int = 0) -> CompletionLogprobs:
        """Logprobs in the legacy completions format; decoding each token's text is tokenizer work."""
        return await self._run(completion_logprobs, self._tokenizer, token_ids, positions, k, text_offset)

    async def chat_logprobs(self, token_ids: list[int], positions: list[PositionLogprobs], k: int) -> ChatLogprobs:
        return await self._run(chat_logprobs, self._tokenizer, token_ids, positions, k)

    def shutdown(self) -> None:
        for pool in (self._pool, self._long_pool):
            pool.shutdown(wait=False, cancel_futures=True)
