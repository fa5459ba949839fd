"""Logprob gathering shared by the sampler (generated tokens) and the runner (prompt_logprobs).

Column 0 holds the chosen token (sampled, or the next prompt token), columns 1..k the k most
likely tokens sorted by descending logprob. A token's rank is 1 + the number of tokens with a
strictly higher logprob, so the most likely token has rank 1 and tied tokens share a rank.
"""
from __future__ import annotations

import torch


def compute_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """The model's raw distribution in float32, whatever dtype the logits arrive in."""
    return torch.log_softmax(logits.float(), dim=-1)


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logprobs [N, V], token_ids [N] -> (ids [N, 1+k] int64, values [N, 1+k], ranks [N] int64).

    k is capped at V. Rows that asked for fewer than k keep only the columns they need.
    """
    token_ids = token_ids.to(torch.int64).unsqueeze(-1)
    token_lp = logprobs.gather(-1, token_ids)
    ranks = (logprobs > token_lp).sum(-1) + 1
    k = min(k, logprobs.shape[-1])
    if k > 0:
        top_lp, top_ids = torch.topk(logprobs, k, dim=-1)
        ids = torch.cat([token_ids, top_ids], dim=-1)
        values = torch.cat([token_lp, top_lp], dim=-1)
    else:
        ids, values = token_ids, token_lp
    return ids, values, ranks
