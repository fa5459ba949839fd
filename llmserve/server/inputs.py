"""Prompts to token ids. Tokenizing and templating run on one worker thread: off the event loop,
and never two encodes at once on the (not reliably thread-safe) tokenizer."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from llmserve.server.errors import bad_request
from llmserve.server.protocol import ChatMessage
from llmserve.tokenizer import apply_chat_template

MAX_BATCH_PROMPTS = 64  # prompts in one completions request


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]


class Tokenization:
    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmserve-tokenize")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self._run(lambda: self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

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
        return Prompt(await self._run(apply_chat_template, self.tokenizer, conversation, add_generation_prompt))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        if any(t < 0 or t >= self.vocab_size for t in token_ids):
            raise bad_request(f"token ids must be integers in [0, {self.vocab_size}).", "tokens")
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
