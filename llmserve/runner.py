"""Turns a SchedulerOutput into batched tensors, runs the forward pass and samples.

The runner owns the KV cache tensors (per page one K and one V tensor of shape
[num_blocks * block_size, kv_heads, head_dim], addressed by flat slot = block_id * block_size +
offset; a layer's KV lives in its page, in the blocks of its group: model/specs.py) and the
persistent batch (input_batch.py): rows kept between steps, of which each step writes only what
changed.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from llmserve.attention.backend import AttentionBackend, KVCaches, TorchAttention
from llmserve.attention.kv_dtype import bits, to_cache
from llmserve.attention.metadata import AttentionBatch, AttentionLayer, StateBatch
from llmserve.engine.block_pool import Block
from llmserve.engine.kv_policy import SCORED_POLICIES, attention_scores, keyformer_scores, keyformer_tau
from llmserve.input_batch import InputBatch
from llmserve.model.specs import kv_layout
from llmserve.engine.scheduler import SampledTokens, ScheduledRequest, SchedulerOutput
from llmserve.sampling.logprobs import compute_logprobs, gather_logprobs
from llmserve.outputs import PositionLogprobs
from llmserve.sampling.metadata import SamplingMetadata, TokenHistory
from llmserve.sampling.sampler import Sampler, SamplerOutput
from llmserve.sampling.verify import num_accepted, rewind_generator, verify_rows


STATE_DTYPE = torch.float32


@dataclass
class ExportedKV:
    """A request's cache as plain CPU tensors, for another engine's import: per KV group
    [its layers, 2, num_tokens, kv_heads, head_dim] (zeros where a window group dropped a block),
    and per state-space layer its conv and SSM state."""
    num_tokens: int
    groups: list[torch.Tensor]
    states: list[torch.Tensor]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.groups, *self.states))


@dataclass
class StepResult:
    """What one step produced, in the order of the scheduled requests that sampled."""
    sampled: list[ScheduledRequest]
    sampler_output: SamplerOutput | None
    # request_id -> prompt logprobs of the prompt positions computed this step (ids, values, ranks)
    prompt_logprobs: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    # Speculative decoding: each sampling request scored 1 + its drafts positions (its rows in the
    # sampler output, in order) and accepted this many drafts. None when no request had drafts.
    accepted: list[int] | None = None
    # Lossy requests under a scored KV policy: each cached token's score from this step's
    # attention (engine/kv_policy.py), by request id.
    kv_scores: dict[str, np.ndarray] | None = None

    def sampled_tokens(self) -> list[SampledTokens]:
        """Each sampling request's new tokens (the accepted drafts and then the target's own token),
        with logprob entries for the requests that asked for them."""
        out = self.sampler_output
        if out is None:
            return []
        token_ids = out.token_ids.tolist()
        lp_ids = out.logprob_token_ids.tolist() if out.logprob_token_ids is not None else None
        lp_vals = out.logprobs.tolist() if out.logprobs is not None else None
        ranks = out.sampled_ranks.tolist() if out.sampled_ranks is not None else None
        result = []
        row = 0
        for i, s in enumerate(self.sampled):
            emitted = 1 + (self.accepted[i] if self.accepted is not None else 0)
            k = s.request.params.logprobs
            entries = None
            if k is not None and lp_ids is not None:
                entries = [position_logprobs(lp_ids[r], lp_vals[r], ranks[r], k) for r in range(row, row + emitted)]
            result.append(SampledTokens(s.request, token_ids[row:row + emitted], entries, s.num_draft))
            row += 1 + s.num_draft
        return result


def position_logprobs(ids: list[int], vals: list[float], sampled_rank: int, k: int | None) -> PositionLogprobs:
    """The chosen token with its rank, then the top-k tokens with ranks 1..k."""
    entry: PositionLogprobs = {ids[0]: (vals[0], sampled_rank)}
    for r, (t, v) in enumerate(zip(ids[1:1 + (k or 0)], vals[1:1 + (k or 0)]), start=1):
        entry.setdefault(t, (v, r))
    return entry


class ModelRunner:
    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, backend_factory: Callable[[KVCaches], AttentionBackend] = TorchAttention,
                 seed: int | None = None, kernels=None, kv_groups: bool = True, num_state_slots: int = 0) -> None:
        """kernels: llmserve's compiled CPU kernels, for the sampler (None: plain torch). kv_groups:
        layers of each kind in their own KV groups (False: one group keeping every token).
        num_state_slots: requests whose state-space layers' state fits at once (model.state_specs())."""
        self.model = model
        self.block_size = block_size
        self.device = device
        self.layout = kv_layout(model.kv_cache_specs(), by_kind=kv_groups)
        for module in model.modules():  # each attention layer reads the slots and tables of its group
            layer = getattr(module, "layer", None)
            if isinstance(layer, AttentionLayer):
                module.layer = replace(layer, group=self.layout.group_of_layer[layer.index])
        self.kv_pages = [tuple(torch.zeros((num_blocks * block_size, *spec.slot_shape()), dtype=dtype, device=device)
                               for _ in range(2)) for spec in self.layout.page_specs]
        self.kv_caches = [self.kv_pages[page] for page in self.layout.page_of_layer]  # per layer
        self.backend = backend_factory(self.kv_caches)
        self.state_specs = model.state_specs() if hasattr(model, "state_specs") else []
        # Per state-space layer (conv state, SSM state), each [num_state_slots, ...]: one slot a request,
        # in float32 whatever the KV dtype (a recurrent state rounded every step drifts).
        self.state_caches = [tuple(torch.zeros((num_state_slots, *shape), dtype=STATE_DTYPE, device=device)
                                   for shape in spec.shapes()) for spec in self.state_specs]
        self.backend.state_caches = self.state_caches
        self.batch = InputBatch(block_size, num_groups=self.layout.num_groups)
        self.sampler = Sampler(seed, kernels)  # unseeded requests draw from it: the engine's seed makes them reproducible
        self._staging: dict[str, torch.Tensor] = {}  # pinned host buffers, reused (CUDA only)

    def remove_requests(self, request_ids: list[str]) -> None:
        """Drop the rows of requests that left the running set (finished, aborted, preempted)."""
        self.batch.remove(request_ids)

    def wipe_blocks(self, block_ids: list[int]) -> None:
        """Zero the KV of freed blocks so nothing of a finished request stays in memory."""
        if not block_ids:
            return
        bs = self.block_size
        slots = (torch.tensor(block_ids, device=self.device)[:, None] * bs + torch.arange(bs, device=self.device)).flatten()
        for k, v in self.kv_pages:
            bits(k).index_fill_(0, slots, 0)
            bits(v).index_fill_(0, slots, 0)

    def wipe_state_slots(self, slots: list[int]) -> None:
        """Zero the state of freed slots (under wipe_kv_on_free)."""
        if not slots:
            return
        index = torch.tensor(slots, device=self.device)
        for conv, ssm in self.state_caches:
            conv.index_fill_(0, index, 0)
            ssm.index_fill_(0, index, 0)

    def move_kv(self, request_id: str, src: np.ndarray, dst: np.ndarray) -> None:
        """Compact a lossy request's cache: copy slots src to dst in every layer (the sources are
        read before any destination is written), and have its row's table rewritten."""
        self.batch.reset_table(request_id)
        if not len(src):
            return
        s, d = torch.from_numpy(src).to(self.device), torch.from_numpy(dst).to(self.device)
        for k, v in self.kv_pages:
            bits(k).index_copy_(0, d, bits(k).index_select(0, s))
            bits(v).index_copy_(0, d, bits(v).index_select(0, s))

    def read_block(self, block_id: int) -> bytes:
        """One block's K and V in every page, as bytes (for the disk tier)."""
        slots = torch.from_numpy(self._slots([block_id], 0, self.block_size)).to(self.device)
        kv = torch.stack([torch.stack((k[slots], v[slots])) for k, v in self.kv_pages]).cpu()
        return kv.contiguous().view(torch.uint8).numpy().tobytes()

    def write_block(self, block_id: int, data: bytes) -> None:
        """Put back what read_block gave for a block of the same shape, into block_id."""
        k = self.kv_pages[0][0]
        shape = (len(self.kv_pages), 2, self.block_size, *k.shape[1:])
        kv = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(k.dtype).reshape(shape).to(self.device)
        slots = torch.from_numpy(self._slots([block_id], 0, self.block_size)).to(self.device)
        for (k, v), page in zip(self.kv_pages, kv):
            bits(k).index_copy_(0, slots, bits(page[0]))
            bits(v).index_copy_(0, slots, bits(page[1]))

    def _slots(self, block_ids: list[int], start: int, end: int) -> np.ndarray:
        pos = np.arange(start, end)
        return np.asarray(block_ids, dtype=np.int64)[pos // self.block_size] * self.block_size + pos % self.block_size

    def export_kv(self, tables: list[list[int]], state_slot: int | None, num_tokens: int) -> ExportedKV:
        """The cache of a request's first num_tokens tokens, held in its per-group block ids and
        its state slot, as CPU tensors (for another engine's import_kv)."""
        groups = []
        for g, ids in enumerate(tables):
            ids = np.asarray(ids[:-(-num_tokens // self.block_size)], dtype=np.int64)
            slots = torch.from_numpy(self._slots(np.maximum(ids, 0), 0, num_tokens)).to(self.device)
            dropped = torch.from_numpy(np.repeat(ids < 0, self.block_size)[:num_tokens]).to(self.device)
            pages = self.kv_pages[:len(self.layout.group_layers[g])]
            kv = torch.stack([torch.stack((k[slots], v[slots])) for k, v in pages]) if pages else torch.empty(0)
            if pages:
                bits(kv).masked_fill_(dropped[None, None, :, None, None], 0)
            groups.append(kv.cpu())
        states = [t[state_slot].cpu() for pair in self.state_caches for t in pair] if state_slot is not None else []
        return ExportedKV(num_tokens, groups, states)

    def import_kv(self, tables: list[list[int]], state_slot: int | None, kv: ExportedKV) -> None:
        """Write an exported request's cache into its per-group block ids (allocated for its
        kv.num_tokens tokens, but for the blocks a window group dropped: id -1) and its state slot."""
        num_tokens = kv.num_tokens
        for ids, group_kv in zip(tables, kv.groups):
            ids = np.asarray(ids[:-(-num_tokens // self.block_size)], dtype=np.int64)
            keep = np.flatnonzero(np.repeat(ids >= 0, self.block_size)[:num_tokens])
            slots = torch.from_numpy(self._slots(np.maximum(ids, 0), 0, num_tokens)[keep]).to(self.device)
            index = torch.from_numpy(keep).to(self.device)
            group_kv = group_kv.to(self.device)
            for (k, v), layer in zip(self.kv_pages, group_kv):
                bits(k).index_copy_(0, slots, bits(to_cache(layer[0].index_select(0, index), k.dtype)))
                bits(v).index_copy_(0, slots, bits(to_cache(layer[1].index_select(0, index), v.dtype)))
        if state_slot is not None:
            for cache, state in zip((t for pair in self.state_caches for t in pair), kv.states):
                cache[state_slot] = state.to(self.device, cache.dtype)

    def _to_device(self, name: str, array: np.ndarray) -> torch.Tensor:
        """A host array on the device: zero-copy on CPU; on CUDA through a reused pinned buffer,
        copied without blocking the host."""
        host = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type != "cuda":
            return host
        buf = self._staging.get(name)
        if buf is None or buf.numel() < host.numel() or buf.dtype != host.dtype:
            buf = self._staging[name] = torch.empty(max(host.numel(), 1024), dtype=host.dtype).pin_memory()
        staged = buf[:host.numel()].view(host.shape)
        staged.copy_(host)
        return staged.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, tables: list[dict[str, list[Block]]],
                state_slots: dict[str, int] | None = None) -> StepResult:
        """One forward over every scheduled token, then logits at the positions that sample (each
        sampling request's last new token) and at prompt positions scored for prompt_logprobs.
        tables: per KV group, each request's block table (KVCacheManager.tables); state_slots:
        each request's state slot, for models with state-space layers."""
        # One-token sequences first: backends that treat decodes as a group find them together.
        items = sorted(sched.scheduled, key=lambda s: s.num_new_tokens != 1)
        num_decodes = sum(1 for s in items if s.num_new_tokens == 1)
        b = self.batch
        rows = np.fromiter((b.sync(s.request.request_id, s.request.token_ids, s.request.num_prompt_tokens,
                                   [t[s.request.request_id] for t in tables]) for s in items),
                           dtype=np.int64, count=len(items))
        for row, s in zip(rows.tolist(), items):
            if s.num_draft:
                b.write_drafts(row, s.draft_token_ids)
        starts = np.fromiter((s.start for s in items), dtype=np.int64, count=len(items))
        counts = np.fromiter((s.num_new_tokens for s in items), dtype=np.int64, count=len(items))
        # Requests under a lossy KV policy hold fewer cached tokens than their positions count.
        evicted = np.fromiter((s.request.num_evicted_tokens for s in items), dtype=np.int64, count=len(items))
        ids, positions, slots = b.gather(rows, starts, counts, evicted if evicted.any() else None)
        seq_lens = starts - evicted + counts
        qsl = np.concatenate(([0], np.cumsum(counts)))
        width = -(-int(seq_lens.max()) // self.block_size)
        # Decodes of requests whose KV policy scores tokens: the backend reports their attention.
        scored_rows = np.array([i for i in range(num_decodes) if items[i].request.kv is not None
                                and items[i].request.kv.policy in SCORED_POLICIES], dtype=np.int64)
        groups = [(self._to_device(f"slots{g}", group_slots), self._to_device(f"tables{g}", b.block_tables[g][rows, :width]))
                  for g, group_slots in enumerate(slots)]
        self.backend.prepare(AttentionBatch(
            slot_mapping=groups[0][0], query_start_loc=self._to_device("qsl", qsl.astype(np.int32)),
            seq_lens=self._to_device("lens", seq_lens.astype(np.int32)),
            block_tables=groups[0][1], block_size=self.block_size,
            num_decodes=num_decodes, query_start_loc_host=qsl, seq_lens_host=seq_lens,
            scored_rows=scored_rows if len(scored_rows) else None, other_groups=tuple(groups[1:]),
            state=self._state_batch(items, starts, counts, state_slots)))
        hidden = self.model(self._to_device("ids", ids), self._to_device("pos", positions), self.backend)
        kv_scores = self._kv_scores([items[i] for i in scored_rows.tolist()], seq_lens[scored_rows]) \
            if len(scored_rows) else None

        sampled = [s for s in items if s.samples]
        sample_idx = [i for i, s in enumerate(items) if s.samples]
        # Each sampling request's last 1 + k positions (k drafts verified; k = 0 for most).
        widths = np.fromiter((1 + s.num_draft for s in sampled), dtype=np.int64, count=len(sampled))
        within = np.arange(int(widths.sum())) - np.repeat(np.cumsum(widths) - widths, widths)
        sample_at = (np.repeat(qsl[1:][sample_idx] - widths, widths) + within).tolist() if sampled else []
        scored = self._prompt_positions(items, qsl)
        at = sample_at + [p for _, first, n in scored for p in range(first, first + n)]
        logits = self.model.compute_logits(hidden[self._to_device("logits_at", np.asarray(at, dtype=np.int64))]) \
            if at else None
        out, accepted = None, None
        if sampled:
            out, accepted = self._sample(sampled, rows[sample_idx], widths, within, logits[:len(sample_at)])
        prompt_lp = {}
        offset = len(sample_at)
        for s, _, n in scored:
            req = s.request
            targets = torch.tensor(req.token_ids[s.start + 1:s.start + 1 + n], device=self.device)
            prompt_lp[req.request_id] = gather_logprobs(compute_logprobs(logits[offset:offset + n]), targets,
                                                        req.params.prompt_logprobs)
            offset += n
        return StepResult(sampled, out, prompt_lp, accepted, kv_scores)

    def _state_batch(self, items: list[ScheduledRequest], starts: np.ndarray, counts: np.ndarray,
                     state_slots: dict[str, int] | None) -> StateBatch | None:
        if not self.state_specs:
            return None
        slots = np.fromiter((state_slots[s.request.request_id] for s in items), dtype=np.int64, count=len(items))
        return StateBatch.build(slots, starts, counts, self.state_specs[0].conv_len + 1, self.device)

    def _kv_scores(self, items: list[ScheduledRequest], lengths: np.ndarray) -> dict[str, np.ndarray]:
        """Each scored request's per-token score of this step (engine/kv_policy.py), from the
        attention logits the backend reported for it, over every layer and head."""
        logits = self.backend.take_decode_logits().float().cpu().numpy()  # [layers, rows, heads, length]
        scores = {}
        for i, (s, n) in enumerate(zip(items, lengths.tolist())):
            state = s.request.kv
            row = logits[:, i, :, :n].astype(np.float64)
            if state.policy == "h2o":
                scores[s.request.request_id] = attention_scores(row)
            else:
                tau = keyformer_tau(state.steps, s.request.max_tokens)
                scores[s.request.request_id] = keyformer_scores(row, tau, state.rng)
        return scores

    def _sample(self, sampled: list[ScheduledRequest], sample_rows: np.ndarray, widths: np.ndarray,
                within: np.ndarray, logits: torch.Tensor) -> tuple[SamplerOutput, list[int] | None]:
        """Sample every scored position in one sampler call; with drafts, verify them
        (sampling/verify.py) and return how many each request accepted."""
        b = self.batch
        speculative = any(s.num_draft for s in sampled)
        if speculative:
            rows = [r for s in sampled for r in verify_rows(s.request, s.draft_token_ids)]
            hist_rows = np.repeat(sample_rows, widths)
            # A seeded request's generator is rewound after verification to one uniform per emitted token.
            states = {i: s.request.generator.get_state() for i, s in enumerate(sampled)
                      if s.num_draft and s.request.generator is not None and not s.request.params.greedy}
        else:
            rows, hist_rows, states = [s.request for s in sampled], sample_rows, {}

        def history() -> TokenHistory:
            return TokenHistory(b.token_ids[hist_rows], b.prompt_lens[hist_rows], b.num_tokens[hist_rows] + within)

        meta = SamplingMetadata.from_rows(rows, logits.shape[-1], self.device, history)
        out = self.sampler(logits, meta)
        if not speculative:
            return out, None
        targets = out.token_ids.tolist()
        accepted, row = [], 0
        for i, s in enumerate(sampled):
            a = num_accepted(targets[row:row + s.num_draft], s.draft_token_ids)
            accepted.append(a)
            if i in states:
                rewind_generator(s.request.generator, states[i], a + 1, self.device)
            row += 1 + s.num_draft
        return out, accepted

    @staticmethod
    def _prompt_positions(items: list[ScheduledRequest], qsl: np.ndarray) -> list[tuple[ScheduledRequest, int, int]]:
        """(item, first flat row, count) of the prompt positions scored for prompt_logprobs: position
        p predicts token p + 1, so only positions before the prompt's last token count."""
        scored = []
        for i, s in enumerate(items):
            req = s.request
            if req.params.prompt_logprobs is None or s.start >= req.num_prompt_tokens - 1:
                continue
            n = min(s.start + s.num_new_tokens, req.num_prompt_tokens - 1) - s.start
            scored.append((s, int(qsl[i]), n))
        return scored
