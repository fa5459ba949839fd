"""The unified paged attention kernel (csrc/paged_attention.cpp) against the plain-torch
reference backend (TorchAttention: write the cache, gather each context, grouped matmul for the
decodes and F.scaled_dot_product_attention per chunk), side by side in one run:

  (a) decode: 64 sequences at 260 context tokens, SmolLM2-135M's heads (9 query, 3 KV, D=64);
  (b) prefill: one 512-token chunk after 0 and 300 cached tokens;
  (c) both in one step.

Every timing includes the step's cache writes. Usage: python benchmarks/attention_kernel.py [--iters N]
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

H, KVH, D, BLOCK = 9, 3, 64, 16
SCALE = D ** -0.5


def timed(new, old, iters: int) -> tuple[float, float]:
    """Median seconds per call of each, after a warm-up; calls alternate, so a load that comes and
    goes on the machine falls on both alike. Also prints both fastest calls: on a shared machine
    the medians carry others' load, the minima much less."""
    for _ in range(3):
        new()
        old()
    t_new, t_old = [], []
    for _ in range(iters):
        for fn, times in ((new, t_new), (old, t_old)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    print(f"    fastest: {min(t_new) * 1e3:.3f} ms vs {min(t_old) * 1e3:.3f} ms = {min(t_old) / min(t_new):.2f}x")
    return statistics.median(t_new), statistics.median(t_old)


class Step:
    """A step's sequences, (query tokens, cached tokens) each, on shuffled blocks of one cache."""

    def __init__(self, seqs, seed=0):
        g = torch.Generator().manual_seed(seed)
        lens = [ql + pre for ql, pre in seqs]
        nblocks = [math.ceil(n / BLOCK) for n in lens]
        perm = torch.randperm(sum(nblocks), generator=g)
        self.tables = torch.zeros(len(seqs), max(nblocks), dtype=torch.int32)
        at = 0
        for b, n in enumerate(nblocks):
            self.tables[b, :n] = perm[at:at + n]
            at += n
        slots_per_seq = []
        for b, n in enumerate(lens):
            pos = torch.arange(n)
            slots_per_seq.append(self.tables[b, pos // BLOCK].long() * BLOCK + pos % BLOCK)
        self.slots = torch.cat([s[pre:] for s, (ql, pre) in zip(slots_per_seq, seqs)])
        T, S = int(self.slots.shape[0]), sum(nblocks) * BLOCK
        self.k_cache = torch.randn(S, KVH, D, generator=g)
        self.v_cache = torch.randn(S, KVH, D, generator=g)
        qkv = torch.randn(T, H + 2 * KVH, D, generator=g)  # q, k, v as slices of a fused projection
        self.q, self.k, self.v = qkv[:, :H], qkv[:, H:H + KVH], qkv[:, H + KVH:]
        self.qsl = torch.tensor([0] + [ql for ql, _ in seqs], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        self.lens = torch.tensor(lens, dtype=torch.int32)
        self.seqs = seqs

    def unified(self, kernels):
        return kernels.paged_attention(self.q, self.k, self.v, self.k_cache, self.v_cache, self.slots, self.qsl,
                                       self.lens, self.tables, BLOCK, SCALE, 0, 0.0)

    def reference(self):
        """The torch backend over the same step (prepare once, as the runner does per step)."""
        import numpy as np

        from llmserve.attention.backend import TorchAttention
        from llmserve.attention.metadata import AttentionBatch, AttentionLayer

        nd = sum(1 for ql, _ in self.seqs if ql == 1)
        backend = TorchAttention([(self.k_cache, self.v_cache)])
        backend.prepare(AttentionBatch(self.slots, self.qsl, self.lens, self.tables, BLOCK, nd,
                                       self.qsl.numpy().astype(np.int64), self.lens.numpy().astype(np.int64)))
        layer = AttentionLayer(0, SCALE)
        return lambda: backend.forward(layer, self.q, self.k, self.v)


def main(kernels=None, iters=50):
    if kernels is None:
        from llmserve.kernels import cpu_kernels

        kernels = cpu_kernels()
        if kernels is None:
            raise SystemExit("the CPU kernels are unavailable here (no compiler?)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; H={H} KVH={KVH} D={D} block={BLOCK}")

    cases = [("(a) 64 decodes x 260 ctx", Step([(1, 259)] * 64)),
             ("(b) 512-token chunk, 0 cached", Step([(512, 0)])),
             ("(b) 512-token chunk, 300 cached", Step([(512, 300)])),
             ("(c) 64 decodes + 512-token chunk (300 cached), one step", Step([(1, 259)] * 64 + [(512, 300)]))]
    for name, step in cases:
        reference = step.reference()
        new, old = timed(lambda: step.unified(kernels), reference, iters)
        torch.testing.assert_close(step.unified(kernels), reference(), atol=1e-4, rtol=1e-4)
        print(f"{name}: paged_attention {new * 1e3:7.3f} ms | torch backend {old * 1e3:7.3f} ms | "
              f"torch/unified = {old / new:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    main(iters=args.iters)
