"""Structured outputs: output constrained by a JSON schema, a regex, a choice list or a grammar.

The grammar engine is llguidance (a maintained Rust library on PyPI). `StructuredOutputsParams`
says what is asked (vLLM's names), `GrammarCompiler` compiles and caches it per engine,
`GrammarState` is one sequence's matcher (advanced at the scheduler's update point), and
`bitmask` turns the batch's matchers into one token bitmask the sampler applies in one op.
"""
from llmserve.structured.compiler import GrammarCompiler, GrammarState
from llmserve.structured.params import GrammarError, StructuredOutputsParams

__all__ = ["GrammarCompiler", "GrammarError", "GrammarState", "StructuredOutputsParams"]
