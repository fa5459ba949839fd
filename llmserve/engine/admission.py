"""What a request must satisfy before an engine takes it: checked by the engine, and by the
replicas' front end before it hands a request over without waiting for the replica's answer."""
from __future__ import annotations

from dataclasses import dataclass

from llmserve.config import EngineConfig
from llmserve.engine.kv_policy import KVPolicyState
from llmserve.errors import InvalidRequestError, PromptTooLongError
from llmserve.model.arch_config import SLIDING
from llmserve.sampling_params import SamplingParams
from llmserve.structured.compiler import GrammarCompiler


@dataclass(repr=False)
class Admitted:
    """A request that passed: its prompt ids, its token budget (capped by the context), its KV
    policy (None: full) and its compiled grammar (None: unconstrained)."""
    token_ids: list[int]
    max_tokens: int
    kv_state: KVPolicyState | None
    grammar: object | None  # the compiled matcher (GrammarCompiler.compile)


@dataclass
class Admission:
    """The checks of one model: its vocabulary and context, the engine's KV policy, its grammars."""
    vocab_size: int
    max_model_len: int
    config: EngineConfig
    sliding: bool  # the model has sliding-window layers
    mamba: bool  # the model has state-space layers
    grammars: GrammarCompiler

    @classmethod
    def of(cls, model_config, max_model_len: int, config: EngineConfig, grammars: GrammarCompiler) -> Admission:
        return cls(model_config.vocab_size, max_model_len, config,
                   model_config.sliding_window is not None and SLIDING in model_config.layer_types,
                   model_config.mamba is not None, grammars)

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> Admitted:
        """The request as the engine will run it, or a typed error saying what is wrong (never its content)."""
        ids = self.check_prompt(prompt_token_ids)
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        if params.min_tokens > room:
            raise PromptTooLongError(f"min_tokens is {params.min_tokens} but the prompt leaves room for {room} "
                                     f"tokens in the model's context of {self.max_model_len}")
        if params.logit_bias and any(t >= self.vocab_size for t in params.logit_bias):
            raise InvalidRequestError(f"logit_bias keys must be token ids in [0, {self.vocab_size})")
        kv_state = self.kv_policy_state(params)
        # Compiled only when not compiled before (the server compiles off the loop thread first).
        grammar = self.grammars.compile(params.structured_outputs) if params.structured_outputs else None
        return Admitted(ids, max_tokens, kv_state, grammar)

    def check_prompt(self, prompt_token_ids: list[int]) -> list[int]:
        ids = list(prompt_token_ids)
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        if any(not isinstance(t, int) or t < 0 or t >= self.vocab_size for t in ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens but the model's context is {self.max_model_len} tokens, "
                "leaving no room to generate")
        return ids

    def kv_policy_state(self, params: SamplingParams) -> KVPolicyState | None:
        """The request's KV policy (its own, else the engine's), or None for full: lossy ones need a
        budget and attend over their kept tokens only, which sliding-window layers cannot."""
        policy = params.kv_policy or self.config.kv_policy
        if policy == "full":
            return None
        budget = params.kv_budget if params.kv_budget is not None else self.config.kv_budget
        if budget is None:
            raise InvalidRequestError(f"kv_policy {policy} needs a kv_budget (a token count, or a fraction in (0, 1])")
        if self.sliding:
            raise InvalidRequestError(f"kv_policy {policy} is not supported for models with sliding-window layers")
        if self.mamba:
            raise InvalidRequestError(f"kv_policy {policy} is not supported for models with state-space layers")
        return KVPolicyState(policy, budget, seed=params.seed)
