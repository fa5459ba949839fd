"""Mamba-2 (transformers' Mamba2ForCausalLM): per layer RMSNorm, the Mamba-2 mixer, the residual.

A mixer keeps an O(1) state per request in the runner's state slots (model/specs.py
MambaStateSpec): the conv's last kernel - 1 inputs and the SSM state [heads, head_dim, state].
A step's sequences lie flat, decodes first, as for attention (AttentionBatch; its `state` says
each sequence's slot and whether the slot holds the state after its computed tokens). The conv
reads a sequence's previous inputs from its slot; a prefill chunk runs the SSD chunked scan (Dao
and Gu 2024) from its slot's state, a decode the recurrent update; both write the state back.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.attention.backend import AttentionBackend
from llmserve.model.arch_config import ArchConfig
from llmserve.model.layers import RMSNorm
from llmserve.model.linear import Projection, WeightStorage
from llmserve.model.ops import TorchOps
from llmserve.model.specs import LayerSpec, MambaStateSpec


class GatedRMSNorm(nn.Module):
    """RMS norm of x * silu(gate) over groups of the channels, in float32 (transformers'
    MambaRMSNormGated)."""

    def __init__(self, dim: int, groups: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.groups, self.eps = groups, eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = x.float() * F.silu(gate.float())
        g = h.view(*h.shape[:-1], self.groups, -1)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.view(h.shape).to(x.dtype)


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             chunk: int, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's SSM over L tokens from `state` [H, P, N], in chunks of `chunk`: within a chunk
    as a masked (decaying) attention of C against B, between chunks by passing the state on.
    x [L, H, P], dt [L, H] (discretization steps), A [H] (negative), B and C [L, H, N].
    Returns y [L, H, P] (without the D skip) and the state after the last token."""
    L, H, P = x.shape
    N = B.shape[-1]
    a = dt * A  # log decay of each step
    xd = x * dt[..., None]
    c = math.ceil(L / chunk)
    pad = c * chunk - L
    if pad:  # zero steps: no decay, no input
        a, xd, B, C = (F.pad(t, (0, 0) * (t.dim() - 1) + (0, pad)) for t in (a, xd, B, C))
    a, xd = a.view(c, chunk, H), xd.view(c, chunk, H, P)
    B, C = B.view(c, chunk, H, N), C.view(c, chunk, H, N)
    cum = a.cumsum(1)  # [c, Q, H]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    seg = (cum[:, :, None, :] - cum[:, None, :, :]).masked_fill(~causal[None, :, :, None], float("-inf"))
    scores = torch.einsum("clhn,cshn->clsh", C, B) * seg.exp()  # position l reads position s <= l
    y = torch.einsum("clsh,cshp->clhp", scores, xd)
    to_end = (cum[:, -1:, :] - cum).exp()  # decay from each position to its chunk's end
    chunk_states = torch.einsum("cshn,csh,cshp->chpn", B, to_end, xd)
    chunk_decay = cum[:, -1, :].exp()  # [c, H]
    entering = []
    for i in range(c):
        entering.append(state)
        state = state * chunk_decay[i][:, None, None] + chunk_states[i]
    y = y + torch.einsum("clhn,chpn->clhp", C, torch.stack(entering)) * cum.exp()[..., None]
    return y.reshape(c * chunk, H, P)[:L], state


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: ArchConfig, state_index: int, storage: WeightStorage) -> None:
        super().__init__()
        m = cfg.mamba
        self.m = m
        self.state_index = state_index  # which of the runner's state caches is this layer's
        self.in_proj = Projection(cfg.hidden_size, m.intermediate_size + m.conv_dim + m.num_heads, m.use_bias, storage)
        self.conv1d = nn.Conv1d(m.conv_dim, m.conv_dim, m.conv_kernel, groups=m.conv_dim, bias=m.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(m.num_heads))
        self.A_log = nn.Parameter(torch.empty(m.num_heads))
        self.D = nn.Parameter(torch.empty(m.num_heads))
        self.norm = GatedRMSNorm(m.intermediate_size, m.n_groups, cfg.rms_norm_eps)
        self.out_proj = Projection(m.intermediate_size, cfg.hidden_size, m.use_bias, storage)

    def state_spec(self) -> MambaStateSpec:
        m = self.m
        return MambaStateSpec(m.conv_dim, m.conv_kernel - 1, m.num_heads, m.head_dim, m.state_size)

    def forward(self, x: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        m = self.m
        batch = backend.batch
        conv_cache, ssm_cache = backend.state_caches[self.state_index]
        gate, xbc, dt = self.in_proj(x).split([m.intermediate_size, m.conv_dim, m.num_heads], dim=-1)
        xbc = F.silu(self._conv(xbc, conv_cache, batch.state))
        xs, B, C = xbc.split([m.intermediate_size, m.n_groups * m.state_size, m.n_groups * m.state_size], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*m.time_step_limit)
        y = self._ssm(xs, dt, B, C, ssm_cache, batch)
        return self.out_proj(self.norm(y.reshape(x.shape[0], -1).to(x.dtype), gate))

    def _conv(self, xbc: torch.Tensor, cache: torch.Tensor, st) -> torch.Tensor:
        """The causal depthwise conv of every token over its sequence's previous inputs (the slot's
        last ones first); the slots then keep each sequence's last kernel - 1 inputs."""
        k = self.m.conv_kernel
        weight = self.conv1d.weight[:, 0, :]  # [conv_dim, k]
        ext = xbc.new_zeros(st.ext_len, xbc.shape[1])
        if st.prefix_rows.numel():
            ext[st.prefix_rows] = (cache[st.slots] * st.has_state[:, None, None].to(cache.dtype)).reshape(
                -1, xbc.shape[1]).to(xbc.dtype)
        ext[st.token_rows] = xbc
        windows = ext[st.token_rows[:, None] - (k - 1) + torch.arange(k, device=xbc.device)]  # [T, k, conv_dim]
        out = torch.einsum("tkc,ck->tc", windows, weight)
        if self.conv1d.bias is not None:
            out = out + self.conv1d.bias
        if st.prefix_rows.numel():
            cache[st.slots] = ext[st.end_rows].view(len(st.slots), k - 1, -1).to(cache.dtype)
        return out

    def _ssm(self, xs: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             cache: torch.Tensor, batch) -> torch.Tensor:
        m = self.m
        H, P, G = m.num_heads, m.head_dim, m.n_groups
        T = xs.shape[0]
        st = batch.state
        x = xs.float().view(T, H, P)
        B = B.float().view(T, G, -1).repeat_interleave(H // G, dim=1)
        C = C.float().view(T, G, -1).repeat_interleave(H // G, dim=1)
        A = -torch.exp(self.A_log.float())
        y = torch.empty_like(x)
        nd = batch.num_decodes
        if nd:  # the recurrent update, all decodes at once
            slots = st.slots[:nd]
            h = cache[slots].float() * st.has_state[:nd, None, None, None]
            h = h * torch.exp(dt[:nd] * A)[..., None, None] + (dt[:nd, :, None] * x[:nd])[..., None] * B[:nd, :, None, :]
            y[:nd] = torch.einsum("bhpn,bhn->bhp", h, C[:nd])
            cache[slots] = h.to(cache.dtype)
        qsl = batch.query_start_loc_host
        for b in range(nd, batch.num_seqs):  # prefill chunks: the chunked scan from the slot's state
            rows = slice(int(qsl[b]), int(qsl[b + 1]))
            slot = int(st.slots_host[b])
            start = cache[slot].float() if st.has_state_host[b] else x.new_zeros(H, P, m.state_size)
            y[rows], final = ssd_scan(x[rows], dt[rows], A, B[rows], C[rows], m.chunk_size, start)
            cache[slot] = final.to(cache.dtype)
        return y + x * self.D.float()[:, None]


class Mamba2Block(nn.Module):
    def __init__(self, cfg: ArchConfig, index: int, storage: WeightStorage) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mixer = Mamba2Mixer(cfg, index, storage)

    def forward(self, h: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        return h + self.mixer(self.norm(h), backend)


class Mamba2ForCausalLM(nn.Module):
    def __init__(self, cfg: ArchConfig, max_model_len: int, ops: TorchOps | None = None,
                 storage: WeightStorage | None = None) -> None:
        super().__init__()
        storage = storage or WeightStorage()
        self.cfg = cfg
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Mamba2Block(cfg, i, storage) for i in range(cfg.num_layers))
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Projection(cfg.hidden_size, cfg.vocab_size, False, storage, tied=cfg.tie_word_embeddings)
        self.ops = ops or TorchOps()
        self.max_model_len = max_model_len

    def kv_cache_specs(self) -> list[LayerSpec]:
        return []  # no attention layers

    def state_specs(self) -> list[MambaStateSpec]:
        return [layer.mixer.state_spec() for layer in self.layers]

    def process_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, Projection) and module is not self.lm_head:
                module.process_weights()
        self.lm_head.process_weights(self.embeddings.weight if self.cfg.tie_word_embeddings else None)

    def init_rope(self) -> None:
        """No positions: the state carries the order."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        h = self.embeddings(input_ids)
        for layer in self.layers:
            h = layer(h, backend)
        return self.norm_f(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
