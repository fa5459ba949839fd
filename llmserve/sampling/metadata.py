"""Per-step sampling inputs: one row per sampling sequence, turned into tensors once.

A row is anything shaped like `SamplingRow` (the engine passes its `Request`s directly).

`SamplingMetadata.from_rows` is the only place that loops over requests in Python; everything it
builds is a small [B] tensor or a padded [B, L] id tensor, so the sampler itself is pure batched
tensor work. Fields that no row needs are left `None`, which is what the sampler's fast paths test.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from llmserve.sampling_params import SamplingParams


@dataclass(repr=False)
class SamplingRow:
    """One row of the batch: a sequence that samples a token this step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens generated so far for this sequence
    # Per-sequence generator when params.seed is set; the engine owns it (created on the runner's
    # device and seeded once), so its state carries over from step to step.
    generator: torch.Generator | None = None
    # The engine fills eos + stop_token_ids here while len(output) < min_tokens.
    banned_token_ids: list[int] = field(default_factory=list)

    def __repr__(self) -> str:  # ids stay out of logs and tracebacks
        return f"SamplingRow(prompt_tokens={len(self.prompt_token_ids)}, output_tokens={len(self.output_token_ids)})"


@dataclass
class SamplingMetadata:
    """Sampling parameters of one step as batched tensors (all on the logits' device)."""

    num_rows: int
    vocab_size: int
    is_greedy: torch.Tensor  # [B] bool
    all_greedy: bool
    # [B] float32; greedy rows hold 1.0 (their sampled result is discarded). None when all greedy.
    temperature: torch.Tensor | None = None
    # Truncation: None when no non-greedy row uses it; neutral values (V, 1.0, 0.0) elsewhere.
    top_k: torch.Tensor | None = None  # [B] int64 in [1, V]
    max_top_k: int = 0  # largest k < V among rows with a limit; a Python int so top-k needs no device sync
    top_p: torch.Tensor | None = None  # [B] float32 in (0, 1]
    min_p: torch.Tensor | None = None  # [B] float32 in [0, 1]
    # Penalties: None when no row uses them.
    repetition_penalty: torch.Tensor | None = None  # [B] float32
    frequency_penalty: torch.Tensor | None = None  # [B] float32
    presence_penalty: torch.Tensor | None = None  # [B] float32
    # Padded with vocab_size (a scratch column); only rows that use the penalty carry their ids.
    prompt_output_ids: torch.Tensor | None = None  # [B, L] int64, for the repetition penalty
    output_ids: torch.Tensor | None = None  # [B, L] int64, for frequency/presence penalties
    # Flat (row, token) pairs to set to -inf.
    banned_rows: torch.Tensor | None = None  # [M] int64
    banned_ids: torch.Tensor | None = None  # [M] int64
    # logit_bias as flat (row, token, bias) triples added to the logits. None when no row has one.
    bias_rows: torch.Tensor | None = None  # [M] int64
    bias_ids: torch.Tensor | None = None  # [M] int64
    bias_values: torch.Tensor | None = None  # [M] float32
    # Structured outputs: the rows with a grammar and their packed allowed-token bitmask
    # ([G, ceil(V / 32)] int32, llguidance's layout). None when no row has a grammar.
    grammar_rows: torch.Tensor | None = None  # [G] int64
    grammar_bitmask: torch.Tensor | None = None  # [G, W] int32
    # Non-greedy rows with their own generator: row index -> generator.
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    # Rows that draw from the sampler's shared generator (non-greedy and unseeded).
    any_unseeded_random: bool = False
    # Largest `logprobs` asked for by any row; None when no row asked.
    max_num_logprobs: int | None = None

    @property
    def no_penalties(self) -> bool:
        return self.repetition_penalty is None and self.frequency_penalty is None

    @property
    def no_top_k(self) -> bool:
        return self.top_k is None

    @property
    def no_top_p(self) -> bool:
        return self.top_p is None

    @property
    def no_min_p(self) -> bool:
        return self.min_p is None

    @property
    def no_banned(self) -> bool:
        return self.banned_rows is None and self.bias_rows is None

    @classmethod
    def from_rows(cls, rows: list[SamplingRow], vocab_size: int, device: torch.device,
                  history: Callable[[], TokenHistory] | None = None) -> SamplingMetadata:
        """history, when given, reads the rows' tokens from the runner's persistent batch (so the
        penalties need no per-token Python); otherwise they come from the rows' id lists."""
        params = [r.params for r in rows]
        greedy = [p.greedy for p in params]
        meta = cls(
            num_rows=len(rows),
            vocab_size=vocab_size,
            is_greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            all_greedy=all(greedy),
        )
        meta.max_num_logprobs = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        _fill_banned(meta, rows, vocab_size, device)
        _fill_logit_bias(meta, params, vocab_size, device)
        _fill_grammar(meta, rows, vocab_size, device)
        _fill_penalties(meta, rows, vocab_size, device, history)
        if not meta.all_greedy:
            _fill_random(meta, rows, vocab_size, device)
        return meta


def _floats(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def _padded_ids(id_lists: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(ids) for ids in id_lists))
    padded = [ids + [pad] * (width - len(ids)) for ids in id_lists]
    return torch.tensor(padded, dtype=torch.int64, device=device)


def _fill_banned(meta: SamplingMetadata, rows: list[SamplingRow], vocab_size: int, device: torch.device) -> None:
    pairs = [(i, t) for i, r in enumerate(rows) for t in set(r.banned_token_ids) if 0 <= t < vocab_size]
    if pairs:
        row_idx, tok_idx = zip(*pairs)
        meta.banned_rows = torch.tensor(row_idx, dtype=torch.int64, device=device)
        meta.banned_ids = torch.tensor(tok_idx, dtype=torch.int64, device=device)


def _fill_logit_bias(meta: SamplingMetadata, params: list[SamplingParams], vocab_size: int,
                     device: torch.device) -> None:
    triples = [(i, t, b) for i, p in enumerate(params) if p.logit_bias for t, b in p.logit_bias.items()
               if 0 <= t < vocab_size]
    if triples:
        row_idx, tok_idx, bias = zip(*triples)
        meta.bias_rows = torch.tensor(row_idx, dtype=torch.int64, device=device)
        meta.bias_ids = torch.tensor(tok_idx, dtype=torch.int64, device=device)
        meta.bias_values = _floats(list(bias), device)


def _fill_grammar(meta: SamplingMetadata, rows: list[SamplingRow], vocab_size: int, device: torch.device) -> None:
    """The grammar rows' next-token bitmask (rows are Requests; a grammar is a GrammarState)."""
    idx = [i for i, r in enumerate(rows) if getattr(r, "grammar", None) is not None]
    if not idx:
        return
    from llmserve.structured.bitmask import fill_bitmask

    eos = getattr(rows[idx[0]], "eos_token_ids", ())
    mask = fill_bitmask([rows[i].grammar for i in idx], vocab_size, eos)
    meta.grammar_rows = torch.tensor(idx, dtype=torch.int64, device=device)
    meta.grammar_bitmask = torch.from_numpy(mask).to(device)


@dataclass
class TokenHistory:
    """The rows' tokens as the runner keeps them: row i holds prompt + output in
    token_ids[i, :num_tokens[i]], the prompt being its first prompt_lens[i]."""
    token_ids: np.ndarray  # [B, W] int64, W >= max(num_tokens)
    prompt_lens: np.ndarray  # [B]
    num_tokens: np.ndarray  # [B]


def _masked_ids(h: TokenHistory, uses: list[bool], from_prompt_end: bool, pad: int,
                device: torch.device) -> torch.Tensor:
    """History ids of the rows that use a penalty, padded with pad (rows that don't are all pad)."""
    width = max(1, int(h.num_tokens.max()))
    col = np.arange(width)[None, :]
    keep = (col < h.num_tokens[:, None]) & np.asarray(uses)[:, None]
    if from_prompt_end:
        keep &= col >= h.prompt_lens[:, None]
    return torch.from_numpy(np.where(keep, h.token_ids[:, :width], pad)).to(device)


def _fill_penalties(meta: SamplingMetadata, rows: list[SamplingRow], vocab_size: int, device: torch.device,
                    history: Callable[[], TokenHistory] | None) -> None:
    params = [r.params for r in rows]
    h = None
    uses_rep = [p.repetition_penalty != 1.0 for p in params]
    if any(uses_rep):
        meta.repetition_penalty = _floats([p.repetition_penalty for p in params], device)
        if history is not None:
            h = history()
            meta.prompt_output_ids = _masked_ids(h, uses_rep, False, vocab_size, device)
        else:  # rows without the penalty contribute no ids, so padding stays as short as possible
            ids = [r.prompt_token_ids + r.output_token_ids if u else [] for r, u in zip(rows, uses_rep)]
            meta.prompt_output_ids = _padded_ids(ids, vocab_size, device)
    uses = [p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params]
    if any(uses):
        meta.frequency_penalty = _floats([p.frequency_penalty for p in params], device)
        meta.presence_penalty = _floats([p.presence_penalty for p in params], device)
        if history is not None:
            meta.output_ids = _masked_ids(h or history(), uses, True, vocab_size, device)
        else:
            ids = [r.output_token_ids if u else [] for r, u in zip(rows, uses)]
            meta.output_ids = _padded_ids(ids, vocab_size, device)


def _fill_random(meta: SamplingMetadata, rows: list[SamplingRow], vocab_size: int, device: torch.device) -> None:
    """Temperature, truncation and generators. Greedy rows get neutral values: their sampled
    token is discarded, and neutral values let a truncation step be skipped when no random row uses it."""
    params = [r.params for r in rows]
    top_k = [vocab_size if p.greedy or p.top_k == 0 else min(p.top_k, vocab_size) for p in params]
    top_p = [1.0 if p.greedy else p.top_p for p in params]
    min_p = [0.0 if p.greedy else p.min_p for p in params]
    meta.temperature = _floats([1.0 if p.greedy else p.temperature for p in params], device)
    if any(k < vocab_size for k in top_k):
        meta.top_k = torch.tensor(top_k, dtype=torch.int64, device=device)
        meta.max_top_k = max(k for k in top_k if k < vocab_size)
    if any(p < 1.0 for p in top_p):
        meta.top_p = _floats(top_p, device)
    if any(p > 0.0 for p in min_p):
        meta.min_p = _floats(min_p, device)
    for i, r in enumerate(rows):
        if r.params.greedy:
            continue
        if r.generator is not None:
            meta.generators[i] = r.generator
        else:
            meta.any_unseeded_random = True
