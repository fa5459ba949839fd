"""Exact verification of draft tokens (speculative decoding), batched with ordinary sampling.

A request that verifies k draft tokens d_0..d_{k-1} is scored at k + 1 positions of the step's one
forward pass. Each of those positions becomes one row of the sampler's batch, set up exactly as the
row of a request that had already accepted the drafts before it (`VerifyRow`: the output so far
plus d_0..d_{j-1}, for min_tokens and the penalties' history), so the sampler draws t_j, the
target's own token at that position, as it would without speculation: argmax for greedy rows, the
inverse CDF of the processed distribution p_j (temperature, top-k/p, min-p, penalties, logit_bias)
for the others, with a seeded request's uniforms taken from its own generator in position order.

The request then accepts d_j while d_j == t_j and emits t_0..t_a (a accepted drafts, then the
target's own token: the correction at the first rejection, or the bonus token when all k are
accepted). Every proposer here drafts one token per position deterministically (its draft
distribution q is a point mass on d_j), and for such a draft this *is* the speculative sampling
rule: P(accept) = P(t_j = d_j) = p_j(d_j) = min(1, p_j(d_j) / q(d_j)), and on rejection t_j is
distributed as p_j conditioned on t_j != d_j, which is max(p_j - q, 0) normalized. It also gives
more than the rule in distribution: with the same uniforms, a seeded request emits exactly the
tokens it emits without speculation, whatever was drafted, the draft length or the batch. For that
a seeded generator is rewound after the step to have consumed one uniform per emitted token.

Grammar (structured-output) requests get no drafts (the proposers skip them), so their matcher is
only ever advanced along accepted tokens.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from llmserve.sampling_params import SamplingParams


@dataclass(repr=False)
class VerifyRow:
    """The sampling row of draft position j > 0 of a verify run: the request as it would be had it
    accepted its first j drafts. Shaped like sampling.metadata.SamplingRow."""
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None
    eos_token_ids: tuple[int, ...]
    banned_token_ids: list[int] = field(default_factory=list)
    grammar: None = None

    def __repr__(self) -> str:  # ids stay out of logs and tracebacks
        return f"VerifyRow(output_tokens={len(self.output_token_ids)})"


def verify_rows(request, drafts: Sequence[int]) -> list:
    """The k + 1 sampling rows of a request verifying drafts: the request itself, then one row per
    draft position (its output grown by the drafts before it)."""
    rows = [request]
    p = request.params
    for j in range(1, len(drafts) + 1):
        out = request.output_token_ids + list(drafts[:j])
        banned = [] if len(out) >= p.min_tokens else (
            list(p.stop_token_ids) + ([] if p.ignore_eos else list(request.eos_token_ids)))
        rows.append(VerifyRow(p, request.prompt_token_ids, out, request.generator, request.eos_token_ids, banned))
    return rows


def num_accepted(targets: Sequence[int], drafts: Sequence[int]) -> int:
    """How many leading drafts equal the target's own tokens at their positions."""
    a = 0
    for d, t in zip(drafts, targets):
        if d != t:
            break
        a += 1
    return a


def rewind_generator(generator: torch.Generator, state: torch.Tensor, num_emitted: int, device: torch.device) -> None:
    """Leave a seeded request's generator as if it had drawn one uniform per emitted token (the
    sampler drew one per scored position, one at a time, as below)."""
    generator.set_state(state)
    for _ in range(num_emitted):
        torch.rand(1, dtype=torch.float64, device=device, generator=generator)
