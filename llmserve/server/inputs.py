"""Prompts to token ids, token ids to text. All tokenizer work of the server runs on one worker
thread: off the event loop, never two calls at once on the (not thread-safe) tokenizer, and on the
server's own copy of it (AsyncLLMEngine.tokenizer), which the engine's loop thread never touches."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from llmserve.outputs import PositionLogprobs
from llmserve.server.errors import bad_request
from llmserve.server.logprobs import chat_logprobs, completion_logprobs
from llmserve.server.protocol import ChatLogprobs, ChatMessage, CompletionLogprobs
from llmserve.tokenizer import apply_chat_template

MAX_BATCH_PROMPTS = 64  # prompts in one completions request


@dataclass(frozen=True, repr=False)
class Prompt:
    token_ids: list[int]

    def __repr__(self) -> str:  # ids stay out of logs and tracebacks
        return f"Prompt(num_tokens={len(self.token_ids)})"


class Tokenization:
    def __init__(self, tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer  # used on the worker thread only
        self.vocab_size = vocab_size
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmserve-tokenize")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
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
            return [Prompt(await self.encode(p)) for p in prompt]
        return [Prompt(list(p)) for p in prompt]

    async def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool) -> Prompt:
        conversation = [{"role": m.role, "content": m.text()} | ({"name": m.name} if m.name else {}) for m in messages]
        return Prompt(await self._run(apply_chat_template, self._tokenizer, conversation, add_generation_prompt))

    async def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        if any(t < 0 or t >= self.vocab_size for t in token_ids):
            raise bad_request(f"token ids must be integers in [0, {self.vocab_size}).", "tokens")
        return await self._run(lambda: self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens))

    async def completion_logprobs(self, token_ids: list[int], positions: list[PositionLogprobs], k: int,
                                  text_offset: int = 0) -> CompletionLogprobs:
        """Logprobs in the legacy completions format; decoding each token's text is tokenizer work."""
        return await self._run(completion_logprobs, self._tokenizer, token_ids, positions, k, text_offset)

    async def chat_logprobs(self, token_ids: list[int], positions: list[PositionLogprobs], k: int) -> ChatLogprobs:
        return await self._run(chat_logprobs, self._tokenizer, token_ids, positions, k)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
