"""Drafts from a model, its draft steps batched across requests.

Three kinds, one proposer:

* self_quantized: the target's own weights re-quantized to GGUF blocks (Q8_0 or Q4_1; on CPU with
  llmserve's kernels the draft also computes with 8-bit activations, the fast lossy path), loaded
  from the target's folder: no extra download.
* self_early_exit: the target's own first L layers, then its final norm and head. No extra weights
  and no extra KV: those layers' K/V of the verified tokens are the target's, so the draft reads
  the target's cache. The K/V it writes for its own draft positions lie past the request's
  computed tokens, in blocks not yet published, and the verify step overwrites them.
* draft_model: a second model (an HF folder) whose vocabulary is the target's.

The first and last keep their own paged KV: tensors of the draft's own layer shapes, indexed by the
target's block ids (a request's block table serves both, so the draft's KV is freed, and wiped,
with the target's). A draft KV position stays valid while the token there is final; after a verify
run the draft's valid prefix is cut back to the request's computed tokens, and a request that is
new to the proposer or was preempted catches up from position 0 in its first draft step.

Drafts are greedy (argmax of the draft's logits): a point-mass draft distribution, which
sampling/verify.py verifies exactly for greedy and sampled requests alike. A wrong draft costs
acceptance, never correctness.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from llmserve.attention.kv_dtype import bits
from llmserve.attention.metadata import AttentionBatch
from llmserve.engine.request import Request
from llmserve.errors import InvalidRequestError
from llmserve.model.gguf_quant import GgufLinear, find_lossless_format
from llmserve.model.linear import WeightStorage
from llmserve.spec.build import TargetParts
from llmserve.spec.config import SpeculativeConfig
from llmserve.spec.proposer import Proposer

logger = logging.getLogger(__name__)

MAX_CATCHUP = 512  # draft KV positions one request computes in one step (the CPU token budget)


class EarlyExit(nn.Module):
    """The target's first num_layers decoder layers, then its final norm: hidden states for its
    head. Calls the target's own submodules (no weights of its own)."""

    def __init__(self, target: nn.Module, num_layers: int) -> None:
        super().__init__()
        self.target = target
        self.num_layers = num_layers

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, backend) -> torch.Tensor:
        from llmserve.model.layers import rotary_tables

        t = self.target
        h = t.embed_tokens(input_ids)
        cos, sin = rotary_tables(t.rope_cos[positions].to(h.dtype), t.rope_sin[positions].to(h.dtype))
        residual = None
        for layer in t.layers[:self.num_layers]:
            h, residual = layer(h, residual, cos, sin, backend, t.ops)
        return t.ops.add_rms_norm(h, residual, t.norm)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.target.compute_logits(hidden)


class ModelDraftProposer(Proposer):
    def __init__(self, config: SpeculativeConfig, target: TargetParts, draft: nn.Module, own_kv: bool) -> None:
        super().__init__(config, target.device.type)
        self.model = draft
        self.device = target.device
        self.block_size = target.block_size
        self.vocab_size = target.vocab_size
        if own_kv:
            self.kv_caches = [tuple(torch.zeros((target.num_blocks * target.block_size, *spec.slot_shape()),
                                                dtype=target.kv_dtype, device=target.device) for _ in range(2))
                              for spec in draft.kv_cache_specs()]
            self.backend = target.backend_factory(self.kv_caches)
        else:  # early exit: the target's own KV of its first layers
            self.kv_caches = None
            self.backend = target.runner.backend
        # request id -> (its preemption count, draft KV positions valid), own KV only
        self._valid: dict[str, tuple[int, int]] = {}

    def forget(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._valid.pop(rid, None)

    def wipe_blocks(self, block_ids: list[int]) -> None:
        if self.kv_caches is None or not block_ids:
            return  # early exit writes only the target's cache, which the runner wipes
        bs = self.block_size
        slots = (torch.tensor(block_ids, device=self.device)[:, None] * bs + torch.arange(bs, device=self.device)).flatten()
        for k, v in self.kv_caches:
            bits(k).index_fill_(0, slots, 0)
            bits(v).index_fill_(0, slots, 0)

    def _start(self, req: Request) -> int:
        """The first position the draft must (re)compute for req."""
        if self.kv_caches is None:
            return req.num_computed_tokens
        preemptions, valid = self._valid.get(req.request_id, (req.num_preemptions, 0))
        if preemptions != req.num_preemptions:
            valid = 0
        return min(valid, req.num_computed_tokens)

    @torch.inference_mode()
    def propose(self, requests: list[Request], lengths: list[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in requests]
        # Blocks for the positions the draft writes (the verify step needs them too); none free: no draft.
        live = [i for i, (req, k) in enumerate(zip(requests, lengths)) if self.kv.allocate(req, k)]
        if not live:
            return drafts
        tables = [self.kv.block_ids(requests[i].request_id) for i in live]
        width = max(len(t) for t in tables)
        table = np.zeros((len(live), width), dtype=np.int32)
        for r, t in enumerate(tables):
            table[r, :len(t)] = t
        starts = np.array([self._start(requests[i]) for i in live], dtype=np.int64)
        ends = np.array([requests[i].num_tokens for i in live], dtype=np.int64)
        # A long catch-up (a new request's prompt) is spread over steps, MAX_CATCHUP tokens a step,
        # so that one long prompt does not hold up the step; it drafts once caught up.
        catching = (ends - starts) > MAX_CATCHUP
        feed = [requests[i].token_ids[s:s + MAX_CATCHUP] for i, s in zip(live, starts.tolist())]
        first = starts.copy()
        active = np.arange(len(live))
        for step in range(max(lengths[i] for i in live)):
            tokens = self._step(feed, starts[active], table[active])
            for r, tok in zip(active.tolist(), tokens):
                if not catching[r]:
                    drafts[live[r]].append(tok)
            starts[active] = ends[active] + step
            keep = np.array([lengths[live[r]] > step + 1 and not catching[r] for r in active.tolist()], dtype=bool)
            active = active[keep]
            if not len(active):
                break
            feed = [[drafts[live[r]][-1]] for r in active.tolist()]
        if self.kv_caches is not None:
            for r, i in enumerate(live):
                req = requests[i]
                # Fed: every token up to the last draft's predecessor (or the catch-up's end).
                valid = int(first[r]) + MAX_CATCHUP if catching[r] else req.num_tokens + len(drafts[i]) - 1
                self._valid[req.request_id] = (req.num_preemptions, valid)
        return drafts

    def _step(self, feed: list[list[int]], starts: np.ndarray, table: np.ndarray) -> list[int]:
        """One draft forward: feed[b] at positions starts[b]..; the argmax at each sequence's last."""
        counts = np.array([len(f) for f in feed], dtype=np.int64)
        order = np.argsort(counts != 1, kind="stable")  # one-token sequences first, as backends expect
        counts, starts, table = counts[order], starts[order], table[order]
        ids = np.concatenate([np.asarray(feed[b], dtype=np.int64) for b in order.tolist()])
        seq = np.repeat(np.arange(len(order)), counts)
        qsl = np.concatenate(([0], np.cumsum(counts)))
        pos = starts[seq] + np.arange(len(seq)) - qsl[:-1][seq]
        bs = self.block_size
        slots = table[seq, pos // bs].astype(np.int64) * bs + pos % bs
        seq_lens = starts + counts
        width = -(-int(seq_lens.max()) // bs)
        self.backend.prepare(AttentionBatch(
            slot_mapping=torch.from_numpy(slots).to(self.device),
            query_start_loc=torch.from_numpy(qsl.astype(np.int32)).to(self.device),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)).to(self.device),
            block_tables=torch.from_numpy(np.ascontiguousarray(table[:, :width])).to(self.device),
            block_size=bs, num_decodes=int((counts == 1).sum()), query_start_loc_host=qsl, seq_lens_host=seq_lens))
        hidden = self.model(torch.from_numpy(ids).to(self.device), torch.from_numpy(pos).to(self.device), self.backend)
        last = torch.from_numpy(qsl[1:] - 1).to(self.device)
        tokens = self.model.compute_logits(hidden[last])[:, :self.vocab_size].argmax(dim=-1).tolist()
        out = [0] * len(order)
        for r, b in enumerate(order.tolist()):
            out[b] = tokens[r]
        return out


@dataclass
class DraftStorage(WeightStorage):
    """The self_quantized draft's weights: where GGUF blocks hold a weight exactly (the blocks a GGUF
    model was published with, as its converted float folder keeps them, or found losslessly in the
    floats) the draft computes with those (as fast, and no drift from the target); every other
    weight is quantized to the configured format."""

    def build(self, weight: torch.Tensor, bias: torch.Tensor | None,
              blocks: list[tuple[str, torch.Tensor]] | None = None) -> nn.Module:
        layer = self._from_blocks(weight, bias, blocks) if blocks and self.kernels is not None else None
        if layer is None:
            found = find_lossless_format(weight)
            layer = (GgufLinear(found[1], found[0], weight.shape[1], bias, self.kernels, self.activations)
                     if found is not None else
                     GgufLinear.from_float(weight, bias, self.fmt, self.kernels, self.activations))
        fmt = getattr(layer, "fmt", "float")
        self.counts[fmt] = self.counts.get(fmt, 0) + 1
        return layer


def build_model_proposer(config: SpeculativeConfig, target: TargetParts) -> ModelDraftProposer:
    if target.runner.layout.windowed:
        raise InvalidRequestError(f"speculative_config method {config.method} keeps the draft's KV by the target's "
                                  "block table, and this model's sliding-window layers drop blocks from theirs: "
                                  "use method ngram")
    if config.method == "self_early_exit":
        layers = getattr(target.model, "layers", None)
        if type(target.model).__name__ != "LlamaForCausalLM" or layers is None:
            raise InvalidRequestError("speculative_config method self_early_exit supports the Llama family "
                                      f"(Llama, Mistral, Qwen2, Qwen3), not {type(target.model).__name__}")
        num_layers = config.num_layers if config.num_layers is not None else max(1, len(layers) // 2)
        if num_layers >= len(layers):
            raise InvalidRequestError(f"speculative_config num_layers must be below the target's {len(layers)} layers")
        return ModelDraftProposer(config, target, EarlyExit(target.model, num_layers), own_kv=False)
    draft = _load_draft(config, target)
    return ModelDraftProposer(config, target, draft, own_kv=True)


def _load_draft(config: SpeculativeConfig, target: TargetParts) -> nn.Module:
    from llmserve.model.arch_config import ArchConfig
    from llmserve.model.loader import load_model

    if config.method == "self_quantized":
        folder = target.folder
        if target.dtype != torch.float32 or target.device.type != "cpu":
            raise InvalidRequestError("speculative_config method self_quantized runs on CPU with float32 "
                                      "activations (--dtype float32)")
        # 8-bit activations where the kernels run them: the draft needs speed, not exactness.
        activations = "q8" if target.kernels is not None else "float32"
        storage = DraftStorage(config.quantization, target.kernels, target.onednn, activations=activations)
    else:
        from llmserve.model.resolve import resolve_model_folder

        folder = resolve_model_folder(config.model)
        arch = ArchConfig.from_folder(folder)
        if arch.vocab_size < target.vocab_size:
            raise InvalidRequestError(f"the draft model's vocabulary ({arch.vocab_size} tokens) is smaller than "
                                      f"the target's ({target.vocab_size}): they must share one")
        storage = WeightStorage("none", target.kernels, target.onednn)
    draft = load_model(folder, target.max_model_len, target.dtype, target.device, target.ops, storage)
    logger.info("draft model for %s: %s", config.method, ", ".join(f"{n} {fmt}" for fmt, n in sorted(storage.counts.items())))
    return draft
