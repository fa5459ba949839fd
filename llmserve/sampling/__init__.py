"""Batched sampling: parameters become tensors once per step, then one pass over the batch.

See `llmserve.sampling.sampler` for the semantics (processing order, logprobs, seeds).
"""
from llmserve.sampling.logprobs import compute_logprobs, gather_logprobs
from llmserve.sampling.metadata import SamplingMetadata, SamplingRow
from llmserve.sampling.sampler import Sampler, SamplerOutput

__all__ = [
    "Sampler",
    "SamplerOutput",
    "SamplingMetadata",
    "SamplingRow",
    "compute_logprobs",
    "gather_logprobs",
]
