"""The offline API, shaped like vLLM's `LLM`."""
from __future__ import annotations

import itertools
import time
from typing import Sequence

from tqdm.auto import tqdm

from llmserve.config import EngineConfig
from llmserve.engine.engine import LLMEngine
from llmserve.errors import InvalidRequestError
from llmserve.outputs import RequestOutput
from llmserve.sampling_params import SamplingParams
from llmserve.tokenizer import apply_chat_template

Prompt = str | list[int]
Message = dict


class LLM:
    """`LLM(model=None)` serves the embedded default model; `model` may be an HF folder or a GGUF file.
    Other keyword arguments are EngineConfig fields (dtype, max_model_len, block_size, ...)."""

    def __init__(self, model: str | None = None, **kwargs) -> None:
        self.config = EngineConfig(model=model, **kwargs)
        if self.config.private:  # private=True: every gated optimization in its safe form (privacy/threats.py)
            from llmserve.privacy.threats import private_config

            self.config = private_config(self.config)
        if self.config.replicas > 1 or self.config.autoscale:
            from llmserve.cluster.replicas import ReplicatedEngine

            self.engine = ReplicatedEngine(self.config)
        else:
            self.engine = LLMEngine(self.config)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stop replicas (and the Ray this LLM started); a single in-process engine needs nothing."""
        if hasattr(self.engine, "shutdown"):
            self.engine.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, use_tqdm: bool = True, priority: Sequence[int] | None = None,
                 cache_salt: str | Sequence[str | None] | None = None) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        token_lists = [self._encode(p) for p in prompts]
        texts = [p if isinstance(p, str) else None for p in prompts]
        return self._run(token_lists, texts, sampling_params, use_tqdm, priority, cache_salt)

    def chat(self, messages: list[Message] | list[list[Message]], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             *, use_tqdm: bool = True, add_generation_prompt: bool = True,
             cache_salt: str | Sequence[str | None] | None = None, tools: list[dict] | None = None,
             split_special_tokens: bool = True) -> list[RequestOutput]:
        """tools: OpenAI tool objects, shown to the model through its chat template (parse calls out
        of the text with `llmserve.tools.get_tool_parser().extract`). split_special_tokens: special-token
        text inside messages stays text (the default); False parses it as control tokens."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        token_lists = [apply_chat_template(self.engine.tokenizer, c, add_generation_prompt, tools=tools,
                                           split_special_tokens=split_special_tokens) for c in conversations]
        return self._run(token_lists, [None] * len(token_lists), sampling_params, use_tqdm, None, cache_salt)

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.engine.tokenizer.encode(prompt)
        if isinstance(prompt, list):
            return prompt
        raise InvalidRequestError("a prompt must be a string or a list of token ids")

    def _run(self, token_lists: list[list[int]], texts: list[str | None], sampling_params, use_tqdm: bool,
             priority: Sequence[int] | None, cache_salt) -> list[RequestOutput]:
        n = len(token_lists)
        params = _broadcast(sampling_params or SamplingParams(), n, "sampling_params")
        for p in params:
            p.validate()  # fields may have been changed since construction
        priorities = _broadcast(priority if priority is not None else 0, n, "priority")
        salts = _broadcast(cache_salt, n, "cache_salt")
        ids: list[str] = []
        try:
            for tokens, text, p, prio, salt in zip(token_lists, texts, params, priorities, salts):
                rid = str(next(self._ids))
                self.engine.add_request(rid, tokens, p, prompt=text, priority=prio, cache_salt=salt)
                ids.append(rid)
            return self._drain(set(ids), use_tqdm)
        except BaseException:
            # A bad prompt, an error or a KeyboardInterrupt while stepping: requests left in the engine
            # would keep their KV blocks and be computed (and returned to no one) by the next call.
            # Finished ones are already gone from the engine, so aborting every id is safe.
            self.engine.abort_request(ids)
            raise

    def _drain(self, ids: set[str], use_tqdm: bool = False) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm or not ids, dynamic_ncols=True)
        start, out_tokens = time.perf_counter(), 0
        try:
            while len(done) < len(ids) and self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished and out.request_id in ids:
                        done[out.request_id] = out
                        out_tokens += sum(len(c.token_ids) for c in out.outputs)
                        bar.update(1)
                        bar.set_postfix_str(f"output {out_tokens / (time.perf_counter() - start):.1f} tok/s")
        finally:
            bar.close()
        return [done[i] for i in sorted(done, key=int)]


def _broadcast(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise InvalidRequestError(f"{name} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n
