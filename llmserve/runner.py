"""Turns a SchedulerOutput into batched tensors, runs the forward pass and samples.

The runner owns the KV cache tensors: per layer one K and one V tensor of shape
[num_blocks * block_size, kv_heads, head_dim], addressed by flat slot = block_id * block_size + offset.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmserve.attention.backend import AttentionBackend, TorchAttention
from llmserve.attention.metadata import AttentionMetadata, PrefillSeq
from llmserve.engine.scheduler import SampledTokens, ScheduledRequest, SchedulerOutput
from llmserve.model.llama import LlamaForCausalLM
from llmserve.sampling.logprobs import compute_logprobs, gather_logprobs
from llmserve.outputs import PositionLogprobs
from llmserve.sampling.metadata import SamplingMetadata
from llmserve.sampling.sampler import Sampler, SamplerOutput


def kv_bytes_per_block(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.cfg
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class StepResult:
    """What one step produced, in the order of the scheduled requests that sampled."""
    sampled: list[ScheduledRequest]
    sampler_output: SamplerOutput | None
    # request_id -> prompt logprobs of the prompt positions computed this step (ids, values, ranks)
    prompt_logprobs: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

    def sampled_tokens(self) -> list[SampledTokens]:
        """Each sampling request's new tokens (one per request until speculative decoding), with
        logprob entries for the requests that asked for them."""
        out = self.sampler_output
        if out is None:
            return []
        token_ids = out.token_ids.tolist()
        lp_ids = out.logprob_token_ids.tolist() if out.logprob_token_ids is not None else None
        lp_vals = out.logprobs.tolist() if out.logprobs is not None else None
        ranks = out.sampled_ranks.tolist() if out.sampled_ranks is not None else None
        result = []
        for i, s in enumerate(self.sampled):
            k = s.request.params.logprobs
            entries = None
            if k is not None and lp_ids is not None:
                entries = [position_logprobs(lp_ids[i], lp_vals[i], ranks[i], k)]
            result.append(SampledTokens(s.request, [token_ids[i]], entries))
        return result


def position_logprobs(ids: list[int], vals: list[float], sampled_rank: int, k: int | None) -> PositionLogprobs:
    """The chosen token with its rank, then the top-k tokens with ranks 1..k."""
    entry: PositionLogprobs = {ids[0]: (vals[0], sampled_rank)}
    for r, (t, v) in enumerate(zip(ids[1:1 + (k or 0)], vals[1:1 + (k or 0)]), start=1):
        entry.setdefault(t, (v, r))
    return entry


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, backend: AttentionBackend | None = None, seed: int | None = None) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        self.backend = backend or TorchAttention()
        cfg = model.cfg
        shape = (num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                          for _ in range(cfg.num_layers)]
        self.sampler = Sampler(seed)  # unseeded requests draw from it: the engine's seed makes them reproducible

    def export_blocks(self, block_ids: list[int], num_tokens: int) -> torch.Tensor:
        """The KV of a request's first num_tokens tokens, held in block_ids, as one CPU tensor
        [layers, 2, num_tokens, kv_heads, head_dim] (for another engine's import_blocks)."""
        slots = torch.from_numpy(self._slots(block_ids, 0, num_tokens)).to(self.device)
        return torch.stack([torch.stack((k[slots], v[slots])) for k, v in self.kv_caches]).cpu()

    def import_blocks(self, block_ids: list[int], kv: torch.Tensor) -> None:
        """Write an exported request's KV into block_ids (allocated for its kv.shape[2] tokens)."""
        slots = torch.from_numpy(self._slots(block_ids, 0, kv.shape[2])).to(self.device)
        kv = kv.to(self.device)
        for (k, v), layer in zip(self.kv_caches, kv):
            k.index_copy_(0, slots, layer[0].to(k.dtype))
            v.index_copy_(0, slots, layer[1].to(v.dtype))

    def wipe_blocks(self, block_ids: list[int]) -> None:
        """Zero the KV of freed blocks so nothing of a finished request stays in memory."""
        if not block_ids:
            return
        bs = self.block_size
        slots = (torch.tensor(block_ids, device=self.device)[:, None] * bs + torch.arange(bs, device=self.device)).flatten()
        for k, v in self.kv_caches:
            k.index_fill_(0, slots, 0)
            v.index_fill_(0, slots, 0)

    def _slots(self, block_ids: list[int], start: int, end: int) -> np.ndarray:
        pos = np.arange(start, end)
        return np.asarray(block_ids, dtype=np.int64)[pos // self.block_size] * self.block_size + pos % self.block_size

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, block_tables: dict[str, list[int]]) -> StepResult:
        # Decodes (one new token) first, so attention handles them as one group.
        items = sorted(sched.scheduled, key=lambda s: s.num_new_tokens != 1)
        num_decode = sum(1 for s in items if s.num_new_tokens == 1)
        ids, positions, slots = [], [], []
        prefills: list[PrefillSeq] = []
        offset = 0
        for s in items:
            req, start, end = s.request, s.start, s.start + s.num_new_tokens
            table = block_tables[req.request_id]
            ids.append(req.token_ids[start:end])
            positions.append(np.arange(start, end))
            slots.append(self._slots(table, start, end))
            if s.num_new_tokens > 1:
                ctx = None if start == 0 else torch.from_numpy(self._slots(table, 0, end)).to(self.device)
                prefills.append(PrefillSeq(offset, s.num_new_tokens, end, ctx))
            offset += s.num_new_tokens

        decode_tables = decode_lens = None
        if num_decode:
            ctx_lens = np.array([s.start + 1 for s in items[:num_decode]])
            max_ctx = int(ctx_lens.max())
            width = -(-max_ctx // self.block_size)
            tables = np.zeros((num_decode, width), dtype=np.int32)
            for row, s in enumerate(items[:num_decode]):
                t = block_tables[s.request.request_id][:width]
                tables[row, :len(t)] = t
            decode_tables = torch.from_numpy(tables).to(self.device)
            decode_lens = torch.from_numpy(ctx_lens.astype(np.int32)).to(self.device)

        input_ids = torch.from_numpy(np.fromiter((t for chunk in ids for t in chunk), dtype=np.int64)).to(self.device)
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(self.device),
            num_decode_tokens=num_decode, decode_slots=None, decode_mask=None, prefills=prefills,
            block_size=self.block_size, decode_block_tables=decode_tables, decode_seq_lens=decode_lens)
        hidden = self.model(input_ids, torch.from_numpy(np.concatenate(positions)).to(self.device),
                            self.kv_caches, meta, self.backend)

        # Token offsets of each item's last new token, for the items that sample.
        ends = np.cumsum([s.num_new_tokens for s in items]) - 1
        sampled = [s for s in items if s.samples]
        out = None
        if sampled:
            idx = torch.from_numpy(np.array([e for s, e in zip(items, ends) if s.samples])).to(self.device)
            logits = self.model.compute_logits(hidden[idx])
            meta_s = SamplingMetadata.from_rows([s.request for s in sampled], logits.shape[-1], self.device)
            out = self.sampler(logits, meta_s)
        prompt_lp = self._prompt_logprobs(items, ends, hidden)
        return StepResult(sampled, out, prompt_lp)

    def _prompt_logprobs(self, items: list[ScheduledRequest], ends: np.ndarray,
                         hidden: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Logprobs of prompt tokens 1.. given their prefixes, for the positions computed this step."""
        result = {}
        for s, end in zip(items, ends):
            req = s.request
            k = req.params.prompt_logprobs
            if k is None or s.start >= req.num_prompt_tokens - 1:
                continue
            first = int(end) - s.num_new_tokens + 1
            # Position p predicts token p + 1; only prompt tokens are scored.
            last_pos = min(s.start + s.num_new_tokens, req.num_prompt_tokens - 1)
            n = last_pos - s.start
            logits = self.model.compute_logits(hidden[first:first + n])
            targets = torch.tensor(req.token_ids[s.start + 1:s.start + 1 + n], device=self.device)
            result[req.request_id] = gather_logprobs(compute_logprobs(logits), targets, k)
        return result
