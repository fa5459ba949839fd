"""Prompt lookup (n-gram) drafting: no weights, only the request's own tokens.

The last n tokens (n from prompt_lookup_max down to prompt_lookup_min) are looked up in the
request's earlier tokens; at the most recent earlier occurrence, the tokens that followed it are the
draft. Text that repeats what the prompt holds (edits, quotes, code) is drafted well. When that
occurrence is so recent that what followed it runs into the end, the text is periodic with that
distance as its period (a loop, a list, a table's rows), and the draft continues the cycle instead of
stopping short.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from llmserve.engine.request import Request
from llmserve.spec.proposer import Proposer


def ngram_draft(tokens: np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix."""
    length = len(tokens)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        suffix = tokens[length - n:]
        # Windows starting at 0..length-n-1: every earlier occurrence (not the suffix itself).
        windows = sliding_window_view(tokens[:length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return np.resize(tokens[start:], k).tolist()  # cyclic when fewer than k follow
    return []


class NgramProposer(Proposer):
    def propose(self, requests: list[Request], lengths: list[int]) -> list[list[int]]:
        c = self.config
        return [ngram_draft(np.asarray(req.token_ids, dtype=np.int64), k, c.prompt_lookup_min, c.prompt_lookup_max)
                for req, k in zip(requests, lengths)]
