"""The unified paged attention kernel (csrc/paged_attention.cpp) against a dense plain-torch
reference: decodes, verifies and prefill chunks over cached prefixes, in one call per step."""
from __future__ import annotations

import math

import pytest
import torch

from llmserve.attention.kv_dtype import to_cache

NAN = float("nan")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """An integer view, so cache contents compare bit for bit (NaN included)."""
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()])


FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def make_batch(seqs, *, H, KVH, D, block_size, dtype=torch.float32, fused=False, window=0, shared=None, seed=0,
               cache_dtype=None):
    """A step's inputs. seqs: (query_len, cached_prefix_len) per sequence, in batch order. Block
    ids are shuffled across the pool; every cache row the step does not own is NaN unless it holds
    a cached prefix token a query may see, so a read of anything else shows in the output.
    shared: {b: a} makes sequence b's cached prefix the first full blocks of sequence a's context,
    which a writes this step (a prefix hit on blocks filled in the same step). cache_dtype: the
    caches' dtype when it differs from the queries' (float32 queries over a narrower cache)."""
    g = torch.Generator().manual_seed(seed)
    shared = shared or {}
    lens = [ql + pre for ql, pre in seqs]
    nblocks = [math.ceil(n / block_size) for n in lens]
    width = max(nblocks + [1])
    total = sum(nblocks) + 3  # a few blocks nobody uses
    perm = torch.randperm(total, generator=g).tolist()
    tables = torch.zeros(len(seqs), width, dtype=torch.int32)
    for b, n in enumerate(nblocks):
        for i in range(n):
            tables[b, i] = perm.pop()
    for b, a in shared.items():  # b reuses a's leading blocks for its prefix
        assert seqs[b][1] % block_size == 0 and seqs[b][1] <= seqs[a][1] + seqs[a][0]
        n = seqs[b][1] // block_size
        tables[b, :n] = tables[a, :n]
    S = total * block_size
    k_cache = torch.full((S, KVH, D), NAN, dtype=cache_dtype or dtype)
    v_cache = torch.full((S, KVH, D), NAN, dtype=cache_dtype or dtype)

    def slot(b, p):
        return int(tables[b, p // block_size]) * block_size + p % block_size

    qsl, slots = [0], []
    for b, (ql, pre) in enumerate(seqs):
        qsl.append(qsl[-1] + ql)
        slots += [slot(b, p) for p in range(pre, pre + ql)]
        first_seen = max(0, pre - window + 1) if window > 0 else 0  # what its first query sees
        if b not in shared:
            for p in range(first_seen, pre):
                s = slot(b, p)
                k_cache[s] = torch.randn(KVH, D, generator=g).to(k_cache.dtype)
                v_cache[s] = torch.randn(KVH, D, generator=g).to(v_cache.dtype)
    T = qsl[-1]
    if fused:  # q, k, v as row-strided slices of one [T, H + 2 KVH, D] projection
        qkv = torch.randn(T, H + 2 * KVH, D, generator=g).to(dtype)
        q, k, v = qkv[:, :H], qkv[:, H:H + KVH], qkv[:, H + KVH:]
    else:
        q = torch.randn(T, H, D, generator=g).to(dtype)
        k = torch.randn(T, KVH, D, generator=g).to(dtype)
        v = torch.randn(T, KVH, D, generator=g).to(dtype)
    return dict(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=torch.tensor(slots, dtype=torch.int64),
                query_start_loc=torch.tensor(qsl, dtype=torch.int32), seq_lens=torch.tensor(lens, dtype=torch.int32),
                block_tables=tables, block_size=block_size)


def reference(q, k, v, k_cache, v_cache, slot_mapping, query_start_loc, seq_lens, block_tables, block_size, scale,
              window, cap):
    """Dense attention in float32: write the step's K/V, gather each sequence's context through its
    block table, mask (causal, window), soft-cap, softmax."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    k_cache[slot_mapping] = to_cache(k, k_cache.dtype)  # rounded into a narrower cache
    v_cache[slot_mapping] = to_cache(v, v_cache.dtype)
    T, H, D = q.shape
    G = H // k_cache.shape[1]
    out = torch.zeros(T, H, D)
    for b in range(seq_lens.shape[0]):
        s, e, n = int(query_start_loc[b]), int(query_start_loc[b + 1]), int(seq_lens[b])
        if e == s:
            continue
        pos = torch.arange(n)
        slots = block_tables[b, pos // block_size].long() * block_size + pos % block_size
        # Rows no query may see are NaN in these tests; the mask below drops them.
        keys = k_cache[slots].float().nan_to_num().repeat_interleave(G, dim=1)  # [n, H, D]
        values = v_cache[slots].float().nan_to_num().repeat_interleave(G, dim=1)
        qpos = torch.arange(n - (e - s), n)
        scores = torch.einsum("thd,nhd->htn", q[s:e].float(), keys) * scale
        if cap > 0:
            scores = cap * torch.tanh(scores / cap)
        seen = pos[None, :] <= qpos[:, None]
        if window > 0:
            seen &= qpos[:, None] - pos[None, :] < window
        probs = torch.softmax(scores.masked_fill(~seen, float("-inf")), dim=-1)
        out[s:e] = torch.einsum("htn,nhd->thd", probs, values)
    return out, k_cache, v_cache


def check(kernels, batch, *, scale=None, window=0, cap=0.0, atol=2e-5, rtol=1e-4):
    D = batch["q"].shape[2]
    scale = scale if scale is not None else D ** -0.5
    args = dict(batch)
    bs = args.pop("block_size")
    want, want_k, want_v = reference(**batch, scale=scale, window=window, cap=cap)
    got = kernels.paged_attention(args["q"], args["k"], args["v"], args["k_cache"], args["v_cache"],
                                  args["slot_mapping"], args["query_start_loc"], args["seq_lens"],
                                  args["block_tables"], bs, scale, window, cap)
    assert got.shape == batch["q"].shape and got.dtype == batch["q"].dtype
    assert torch.equal(_bits(batch["k_cache"]), _bits(want_k)), "K cache differs from exactly the written rows"
    assert torch.equal(_bits(batch["v_cache"]), _bits(want_v)), "V cache differs from exactly the written rows"
    qsl = batch["query_start_loc"].tolist()
    for b in range(len(qsl) - 1):
        rows = slice(qsl[b], qsl[b + 1])
        torch.testing.assert_close(got[rows].float(), want[rows], atol=atol, rtol=rtol,
                                   msg=lambda m, b=b: f"sequence {b}: {m}")


# (query tokens, cached prefix) for every pairing of 1, 5, 64 queries with 0, 17, 300 cached
SHAPES = [(ql, pre) for ql in (1, 5, 64) for pre in (0, 17, 300)]


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", [(2, 2), (3, 1), (8, 2), (8, 1)], ids=lambda h: f"H{h[0]}KVH{h[1]}")
@pytest.mark.parametrize("D", [64, 128, 256])
def test_queries_and_prefixes(kernels, D, heads, block_size):
    H, KVH = heads
    check(kernels, make_batch(SHAPES, H=H, KVH=KVH, D=D, block_size=block_size, seed=D + H))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cache_dtype", [None, torch.float16, *FP8])
@pytest.mark.parametrize("heads", [(9, 3), (8, 8), (16, 2)], ids=lambda h: f"H{h[0]}KVH{h[1]}")
def test_many_decodes_take_whole_rows(kernels, threads, cache_dtype, heads):
    """Enough decodes for every thread: each sequence's KV heads go in one task (whole cache rows);
    with a chunk beside them, a window or a soft cap alike."""
    H, KVH = heads
    decodes = [(1, pre) for pre in (0, 3, 15, 16, 17, 40, 100, 255, 256, 300)]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batch = lambda seqs, **kw: make_batch(seqs, H=H, KVH=KVH, D=64, block_size=16, cache_dtype=cache_dtype,
                                              seed=H * KVH, **kw)
        tol = dict(atol=2e-5, rtol=1e-4) if cache_dtype is None else dict(atol=1e-3, rtol=1e-3)
        check(kernels, batch(decodes), **tol)
        check(kernels, batch(decodes + [(40, 20)], fused=True), **tol)
        check(kernels, batch(decodes, window=24), window=24, **tol)
        check(kernels, batch(decodes), scale=0.5, cap=5.0, **{**tol, "atol": max(tol["atol"], 5e-5)})
    finally:
        torch.set_num_threads(previous)


def test_mixed_step_with_shared_prefix(kernels):
    # Decodes, a verify of 5, and two chunks, interleaved; sequence 4 hits the first two blocks of
    # sequence 6, which sequence 6 writes in this very step (listed after it).
    seqs = [(1, 40), (1, 3), (5, 60), (1, 129), (7, 32), (1, 0), (48, 0), (20, 77), (1, 16)]
    batch = make_batch(seqs, H=9, KVH=3, D=64, block_size=16, fused=True, shared={4: 6})
    assert batch["q"].stride(0) == (9 + 2 * 3) * 64  # really a strided view
    check(kernels, batch)


@pytest.mark.parametrize("D", [64, 40])
@pytest.mark.parametrize("window", [1, 16, 24])
def test_sliding_window(kernels, D, window):
    seqs = [(1, 100), (5, 60), (40, 0), (33, 50), (1, 7), (64, 300)]
    check(kernels, make_batch(seqs, H=4, KVH=2, D=D, block_size=16, window=window, fused=True), window=window)


@pytest.mark.parametrize("D", [64, 48])
def test_soft_cap(kernels, D):
    seqs = [(1, 70), (5, 20), (40, 31), (1, 0)]
    # scale large enough that the cap bites (scores of several times the cap)
    check(kernels, make_batch(seqs, H=6, KVH=2, D=D, block_size=16), scale=0.5, cap=5.0, atol=5e-5)
    check(kernels, make_batch(seqs, H=6, KVH=2, D=D, block_size=16), scale=0.5, cap=5.0, window=9, atol=5e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 80])
def test_half_precision_caches(kernels, dtype, D):
    seqs = [(1, 40), (5, 60), (33, 17), (1, 0), (64, 0)]
    batch = make_batch(seqs, H=8, KVH=2, D=D, block_size=16, dtype=dtype, fused=True)
    check(kernels, batch, atol=2e-2, rtol=2e-2)
    check(kernels, make_batch(seqs, H=8, KVH=2, D=D, block_size=16, dtype=dtype, window=20), window=20,
          cap=3.0, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16, *FP8])
@pytest.mark.parametrize("D", [64, 80])
def test_float_queries_over_narrow_caches(kernels, cache_dtype, D):
    """--kv-cache-dtype: float32 K/V rounded into the cache as torch's .to() rounds (bit for bit;
    the 8-bit formats saturating), then attention in float32 over the widened values, as tight as
    the float32 cache (D=64 takes the vector decode path, D=80 the general one)."""
    seqs = [(1, 40), (5, 60), (33, 17), (1, 0), (64, 0), (1, 300)]
    check(kernels, make_batch(seqs, H=9, KVH=3, D=D, block_size=16, fused=True, cache_dtype=cache_dtype))
    check(kernels, make_batch(seqs, H=8, KVH=2, D=D, block_size=16, window=20, cache_dtype=cache_dtype),
          window=20, cap=3.0)
    # Values a rounding must get right: ties to even, overflow to inf, subnormals, NaN.
    batch = make_batch([(4, 3), (1, 9)], H=4, KVH=2, D=D, block_size=16, cache_dtype=cache_dtype)
    special = torch.tensor([1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -8, 70000.0, -1e-7, 3e-39, NAN, 2.0 ** -24])
    if cache_dtype in FP8:  # ties at 3 (e4m3) and 2 (e5m2) mantissa bits, saturation, subnormals
        special = torch.tensor([1 + 2 ** -4, -(1 + 3 * 2 ** -4), 1 + 2 ** -3, 1 + 3 * 2 ** -3, 460.0, -1e5, 70000.0,
                                2.0 ** -10, 3 * 2.0 ** -10, 2.0 ** -17, 3 * 2.0 ** -17, NAN, -0.0, 2.0 ** -7])
    batch["k"].view(-1)[: special.numel()] = special
    batch["v"].view(-1)[-special.numel():] = special
    args = dict(batch)
    bs = args.pop("block_size")
    kernels.paged_attention(*args.values(), bs, 0.125, 0, 0.0)
    slots = batch["slot_mapping"]
    for got, src in ((batch["k_cache"][slots], batch["k"]), (batch["v_cache"][slots], batch["v"])):
        want = to_cache(src, cache_dtype)
        nan = want.isnan()  # NaN's payload is not specified (torch's own paths differ): NaN stays NaN
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(_bits(got)[~nan], _bits(want)[~nan])


@pytest.mark.parametrize("cache_dtype", FP8)
def test_fp8_stores_round_as_torch_over_every_magnitude(kernels, cache_dtype):
    """The vector store (round to odd into float16, then to nearest even) against torch's own
    conversion: magnitudes from below the smallest subnormal to past saturation, both signs,
    and the exact midpoints between neighbouring 8-bit values, where ties go to even."""
    g = torch.Generator().manual_seed(7)
    T, KVH, D = 64, 2, 64
    batch = make_batch([(T, 0)], H=2, KVH=KVH, D=D, block_size=16, cache_dtype=cache_dtype)
    n = T * KVH * D
    sweep = torch.exp2(torch.empty(n // 2).uniform_(-22, 18, generator=g))
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(cache_dtype).float()
    finite = codes[codes.isfinite()].unique()
    ties = (finite[1:] + finite[:-1]) / 2  # every midpoint between neighbours
    values = torch.cat([sweep, ties, finite])
    values = values[torch.randperm(len(values), generator=g)][:n // 2]
    sign = torch.where(torch.rand(n // 2, generator=g) < 0.5, -1.0, 1.0)
    batch["k"].view(-1)[:n // 2] = values * sign
    batch["k"].view(-1)[n // 2:] = torch.cat([ties, finite, sweep])[:n - n // 2]
    batch["v"].copy_(batch["k"].flip(0))
    args = dict(batch)
    bs = args.pop("block_size")
    kernels.paged_attention(*args.values(), bs, 0.125, 0, 0.0)
    slots = batch["slot_mapping"]
    for got, src in ((batch["k_cache"][slots], batch["k"]), (batch["v_cache"][slots], batch["v"])):
        assert torch.equal(_bits(got), _bits(to_cache(src, cache_dtype)))


def test_narrow_cache_needs_float_queries(kernels):
    batch = make_batch([(3, 5)], H=4, KVH=2, D=64, block_size=16, dtype=torch.bfloat16, cache_dtype=torch.float16)
    args = dict(batch)
    bs = args.pop("block_size")
    with pytest.raises(RuntimeError, match="float32 queries"):
        kernels.paged_attention(*args.values(), bs, 0.125, 0, 0.0)


@pytest.mark.parametrize("D", [20, 48, 96])
@pytest.mark.parametrize("heads", [(16, 1), (5, 5)], ids=lambda h: f"H{h[0]}KVH{h[1]}")
def test_other_head_sizes_and_groups(kernels, D, heads):
    seqs = [(1, 40), (5, 11), (30, 2), (1, 0)]
    check(kernels, make_batch(seqs, H=heads[0], KVH=heads[1], D=D, block_size=8))


def test_empty_step_and_empty_queries(kernels):
    batch = make_batch([], H=4, KVH=2, D=64, block_size=16)
    check(kernels, batch)  # T == 0, B == 0
    check(kernels, make_batch([(0, 20), (3, 5), (0, 0)], H=4, KVH=2, D=64, block_size=16))
    # tokens with no sequence: written to the cache, their output rows zero
    batch = make_batch([(4, 0)], H=4, KVH=2, D=64, block_size=16)
    out = kernels.paged_attention(batch["q"], batch["k"], batch["v"], batch["k_cache"], batch["v_cache"],
                                  batch["slot_mapping"], torch.zeros(1, dtype=torch.int32),
                                  torch.zeros(0, dtype=torch.int32), torch.zeros(0, 1, dtype=torch.int32), 16,
                                  0.125, 0, 0.0)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(batch["k_cache"][batch["slot_mapping"]], batch["k"])


def test_rejects_bad_inputs_without_data(kernels):
    batch = make_batch([(3, 5)], H=4, KVH=2, D=64, block_size=16)
    args = [batch[n] for n in ("q", "k", "v", "k_cache", "v_cache", "slot_mapping", "query_start_loc", "seq_lens",
                               "block_tables")]
    bad_slots = batch["slot_mapping"].clone()
    bad_slots[1] = batch["k_cache"].shape[0] + 12345
    for i, bad in [(0, batch["q"].to(torch.bfloat16)), (5, bad_slots), (7, batch["seq_lens"] - 6),
                   (8, torch.full_like(batch["block_tables"], 999))]:
        call = list(args)
        call[i] = bad
        with pytest.raises(RuntimeError) as err:
            kernels.paged_attention(*call, 16, 0.125, 0, 0.0)
        assert "12345" not in str(err.value) and "999" not in str(err.value)


@pytest.mark.parametrize("D", [64, 24])  # the vector decode path; the flash path (D % 32 != 0)
@pytest.mark.parametrize("cache_dtype", [None, torch.float16])
@pytest.mark.parametrize("cap", [0.0, 30.0])
@pytest.mark.parametrize("threads", [1, 4])  # 5 decodes: whole rows a task with 1 thread, a head a task with 4
def test_decode_logits_are_the_scaled_scores_of_each_decode_row(kernels, D, cache_dtype, cap, threads):
    """decode_logits (for the KV policies that score tokens): each decode row's q.k * scale
    (soft-capped) at the positions it attends; rows of longer queries and positions past a decode's
    context are left as they were."""
    seqs = [(1, 37), (5, 11), (1, 0), (1, 70), (1, 20), (1, 5)]
    batch = make_batch(seqs, H=6, KVH=2, D=D, block_size=16, cache_dtype=cache_dtype, seed=3)
    args = dict(batch)
    bs = args.pop("block_size")
    length = 80
    logits = torch.full((len(seqs), 6, length), -7.0)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        kernels.paged_attention(*args.values(), bs, 0.2, 0, cap, logits)
    finally:
        torch.set_num_threads(previous)
    k_cache, tables = batch["k_cache"], batch["block_tables"]
    qsl = batch["query_start_loc"].tolist()
    for b, (ql, pre) in enumerate(seqs):
        if ql != 1:
            assert torch.all(logits[b] == -7.0), "a longer query's row was written"
            continue
        n = pre + 1
        pos = torch.arange(n)
        keys = k_cache[tables[b, pos // bs].long() * bs + pos % bs].float().repeat_interleave(3, dim=1)  # [n, H, D]
        want = torch.einsum("hd,nhd->hn", batch["q"][qsl[b]].float(), keys) * 0.2
        if cap > 0:
            want = cap * torch.tanh(want / cap)
        torch.testing.assert_close(logits[b, :, :n], want, atol=1e-4, rtol=1e-4)
        assert torch.all(logits[b, :, n:] == -7.0)


def test_decode_logits_must_fit(kernels):
    batch = make_batch([(1, 40)], H=4, KVH=2, D=32, block_size=16)
    args = dict(batch)
    bs = args.pop("block_size")
    with pytest.raises(RuntimeError, match="decode_logits"):
        kernels.paged_attention(*args.values(), bs, 0.2, 0, 0.0, torch.zeros(1, 4, 40))
    with pytest.raises(RuntimeError, match="decode_logits"):
        kernels.paged_attention(*args.values(), bs, 0.2, 0, 0.0, torch.zeros(1, 4, 64, dtype=torch.float64))
