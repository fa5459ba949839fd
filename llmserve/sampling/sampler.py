"""Batched sampler: one call per engine step over the logits of every row that samples a token.

Semantics
---------
* Logits arrive float32 or bf16/fp16 and are upcast to float32. The caller's tensor is never
  modified. `logits.shape[-1]` must equal `meta.vocab_size`.
* Reported logprobs are the model's raw distribution: `log_softmax` of the logits *before*
  banning, logit_bias, penalties, temperature and truncation (what OpenAI and vLLM V1 report),
  except for the grammar: a row with structured outputs has its disallowed tokens set to -inf
  first, so its logprobs are those of the grammar-masked distribution (as in vLLM V1, which
  applies the grammar bitmask to the logits before its sampler computes logprobs). Column 0 is
  the sampled token, columns 1..k the top-k (k = the largest `logprobs` any row asked for; a row
  that asked for fewer keeps only its first columns). `sampled_ranks` is 1 + the number of tokens
  with a strictly higher raw logprob.
* Processing order, all batched:
    0. the grammar bitmask (rows with structured outputs): disallowed tokens -> -inf;
    1. banned tokens -> -inf (eos + stop ids while below min_tokens; filled by the engine), then
       logit_bias added;
    2. repetition penalty over prompt + output tokens (HF/vLLM: a positive logit is divided by the
       penalty, a negative one multiplied);
    3. frequency and presence penalties over output tokens only:
       `logit -= frequency * count + presence * (count > 0)`;
    4. greedy rows (temperature 0) take the argmax here; ties go to the lower token id;
    5. temperature;
    6. top-k (keep tokens whose logit is >= the k-th largest, so ties at the boundary stay);
    7. top-p on the top-k-renormalized distribution (keep the smallest most-likely set whose mass
       reaches top_p; the most likely token always stays);
    8. min-p (drop tokens whose prob < min_p * the largest prob, after steps 6-7);
    9. sample by inverse CDF: one U ~ [0, 1) per row, token = the first whose float64 cumulative
       probability exceeds U * total, which draws exactly from p (no renormalization needed, and
       one random number a row instead of one per vocabulary entry). With the CPU kernels, steps
       4-9 are one kernel call (`sample_rows`, csrc/sampling.cpp): the same rules, per row in one
       thread's cache, float64 sums without a float64 copy of the batch, and top-p without a sort.
* Randomness: a row with a generator (the engine gives one to each request with a seed) draws its
  U with that generator alone, so its tokens do not depend on the rest of the batch or its
  position in it. Unseeded rows share one draw from the sampler's own
  generator (seeded by `Sampler(seed=...)`, otherwise nondeterministically).
* Fast path: all-greedy batches with no penalties, no banned tokens and no logit_bias are a bare
  argmax (of the grammar-masked logits when a row has a grammar). A batch without grammar rows
  does no bitmask work at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmserve.sampling.logprobs import compute_logprobs, gather_logprobs
from llmserve.sampling.metadata import SamplingMetadata
from llmserve.structured.bitmask import apply_bitmask
from llmserve.sampling_params import MAX_SEED, MIN_SEED, seed_in_range

_NEG_INF = float("-inf")


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None = None  # [B, 1 + k]: sampled token's logprob, then the top-k
    logprob_token_ids: torch.Tensor | None = None  # [B, 1 + k] ids matching `logprobs`
    sampled_ranks: torch.Tensor | None = None  # [B] rank of the sampled token (1 = most likely)


class Sampler:
    def __init__(self, seed: int | None = None, kernels=None) -> None:
        """seed: of the generator that unseeded random rows share (the engine passes its config's
        seed, so the same seed and the same requests give the same tokens); None draws a fresh one.
        kernels: llmserve's CPU kernels; float32 CPU logits are then sampled by `sample_rows`."""
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not seed_in_range(seed)):
            raise ValueError(f"the sampler's seed must be an integer in [{MIN_SEED}, {MAX_SEED}]")
        self._seed = seed
        self._kernels = kernels
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        if logits.shape[-1] != meta.vocab_size:
            raise ValueError(f"logits have {logits.shape[-1]} columns, metadata expects {meta.vocab_size}")
        logits = _grammar_masked(logits, meta)
        raw_logprobs = compute_logprobs(logits) if meta.max_num_logprobs is not None else None
        if meta.all_greedy and meta.no_penalties and meta.no_banned:
            token_ids = self._argmax(logits)
        else:
            token_ids = self._sample(logits, meta)
        return _make_output(token_ids, raw_logprobs, meta.max_num_logprobs)

    def _argmax(self, logits: torch.Tensor) -> torch.Tensor:
        if self._kernels is not None and logits.device.type == "cpu" and logits.dtype == torch.float32:
            return self._kernels.argmax_rows(logits)
        return logits.argmax(dim=-1)

    def compute_probs(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """The distribution non-greedy rows sample from (steps 1-8), e.g. for spec-decode verification.

        Greedy rows get their penalized distribution at temperature 1; callers use argmax for them.
        """
        logits = _penalized(_grammar_masked(logits, meta), meta)
        return _truncated_probs(logits, meta)

    def _sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        kernels = self._kernels if logits.device.type == "cpu" else None
        one_call = kernels is not None and not meta.all_greedy
        logits = _penalized(logits, meta, copy=not one_call)  # sample_rows leaves its input as it is
        if one_call:
            greedy_ids, sampled_ids = kernels.sample_rows(logits, meta.temperature, self._uniforms(logits, meta),
                                                          meta.top_k, meta.top_p, meta.min_p)
            return torch.where(meta.is_greedy, greedy_ids, sampled_ids)
        greedy_ids = logits.argmax(dim=-1)
        if meta.all_greedy:
            return greedy_ids
        probs = _truncated_probs(logits, meta)
        # Inverse CDF in float64: u * total lands in token i's interval [c_{i-1}, c_i) with
        # probability p_i / total, and an interval of zero width (a truncated token) is never hit.
        # float64 keeps even the smallest probabilities' intervals their true width.
        cdf = probs.to(torch.float64).cumsum_(dim=-1)
        target = (self._uniforms(probs, meta) * cdf[:, -1]).unsqueeze(1)
        sampled_ids = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_max_(probs.shape[-1] - 1)
        return torch.where(meta.is_greedy, greedy_ids, sampled_ids)

    def _uniforms(self, probs: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """U ~ [0, 1) per row, float64: one shared draw for the unseeded rows, and for each seeded
        row one from its own generator (so its tokens do not depend on the rest of the batch)."""
        rows, device = probs.shape[0], probs.device
        if meta.any_unseeded_random:
            u = torch.rand(rows, dtype=torch.float64, device=device, generator=self._shared_generator(device))
        else:
            u = torch.zeros(rows, dtype=torch.float64, device=device)  # greedy rows only: discarded
        for row, generator in meta.generators.items():
            u[row] = torch.rand(1, dtype=torch.float64, device=device, generator=generator)[0]
        return u

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self._seed is None:
                gen.seed()
            else:
                gen.manual_seed(self._seed)
            self._generators[device] = gen
        return gen


def _make_output(token_ids: torch.Tensor, raw_logprobs: torch.Tensor | None, k: int | None) -> SamplerOutput:
    if raw_logprobs is None or k is None:
        return SamplerOutput(token_ids=token_ids)
    ids, values, ranks = gather_logprobs(raw_logprobs, token_ids, k)
    return SamplerOutput(token_ids=token_ids, logprobs=values, logprob_token_ids=ids, sampled_ranks=ranks)


def _grammar_masked(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Step 0 on a float32 copy; the logits themselves when no row has a grammar."""
    if meta.grammar_rows is None:
        return logits
    logits = logits.to(torch.float32, copy=True)
    apply_bitmask(logits, meta.grammar_rows, meta.grammar_bitmask)
    return logits


def _penalized(logits: torch.Tensor, meta: SamplingMetadata, copy: bool = True) -> torch.Tensor:
    """Steps 1-3 on a float32 copy (the caller's logits stay untouched); copy=False: the logits
    themselves (as float32) when there is nothing to apply, for a caller that does not write them."""
    if not copy and meta.no_banned and meta.no_penalties:
        return logits.to(torch.float32)
    logits = logits.to(torch.float32, copy=True)
    if meta.banned_rows is not None:
        logits[meta.banned_rows, meta.banned_ids] = _NEG_INF
    if meta.bias_rows is not None:
        logits.index_put_((meta.bias_rows, meta.bias_ids), meta.bias_values, accumulate=True)
    if meta.repetition_penalty is not None:
        apply_repetition_penalty(logits, meta.prompt_output_ids, meta.repetition_penalty)
    if meta.frequency_penalty is not None:
        apply_frequency_presence_penalties(logits, meta.output_ids, meta.frequency_penalty, meta.presence_penalty)
    return logits


def _truncated_probs(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Steps 5-8: temperature, top-k, top-p, min-p; returns (unnormalized after min-p) probs."""
    if meta.temperature is not None:
        logits.div_(meta.temperature.unsqueeze(1))
    if meta.top_p is not None:
        apply_top_k_top_p(logits, meta.top_k, meta.top_p)
    elif meta.top_k is not None:
        apply_top_k(logits, meta.top_k, meta.max_top_k)
    probs = torch.softmax(logits, dim=-1)
    if meta.min_p is not None:
        apply_min_p(probs, meta.min_p)
    return probs


def apply_repetition_penalty(logits: torch.Tensor, token_ids: torch.Tensor, penalty: torch.Tensor) -> None:
    """In place. token_ids [B, L] padded with V: tokens seen in prompt + output."""
    batch, vocab = logits.shape
    seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, token_ids, True)
    seen = seen[:, :vocab]
    pen = penalty.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / pen, logits * pen)
    logits.copy_(torch.where(seen, penalized, logits))


def apply_frequency_presence_penalties(
    logits: torch.Tensor, output_ids: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor
) -> None:
    """In place. output_ids [B, L] padded with V: tokens generated so far."""
    batch, vocab = logits.shape
    counts = torch.zeros(batch, vocab + 1, dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, output_ids, torch.ones_like(output_ids, dtype=logits.dtype))
    counts = counts[:, :vocab]
    logits.sub_(frequency.unsqueeze(1) * counts + presence.unsqueeze(1) * (counts > 0).to(logits.dtype))


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> None:
    """In place: keep logits >= each row's k-th largest; rows with k == V are untouched.

    Uses topk(max_top_k) rather than a full sort; `max_top_k` comes from the host to avoid a sync.
    """
    vocab = logits.shape[-1]
    no_limit = top_k >= vocab
    top_values = torch.topk(logits, max_top_k, dim=-1).values
    kth = top_values.gather(1, (top_k.clamp(max=max_top_k) - 1).unsqueeze(1))
    kth.masked_fill_(no_limit.unsqueeze(1), _NEG_INF)
    logits.masked_fill_(logits < kth, _NEG_INF)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor) -> None:
    """In place: top-k then top-p, from one descending sort."""
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
    remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        kth = sorted_logits.gather(1, (top_k - 1).unsqueeze(1))
        remove = sorted_logits < kth
        sorted_logits = sorted_logits.masked_fill(remove, _NEG_INF)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    # Rows with top_p == 1 are skipped: float rounding can push the cumulative mass past 1.0.
    over = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    over[:, 0] = False
    remove |= over
    mask = torch.empty_like(remove).scatter_(1, sorted_idx, remove)
    logits.masked_fill_(mask, _NEG_INF)


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> None:
    """In place: zero the probs below min_p * the row's largest prob (min_p == 0 keeps all)."""
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    probs.masked_fill_(probs < threshold, 0.0)
