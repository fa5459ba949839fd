"""Mamba-2 (model/mamba2.py) against transformers, token for token: a random tiny config, prompts
longer than the SSD chunk in a batch of mixed lengths, chunk budgets 7 and 64, preemption under
few state slots, a move between engines; the SSD chunked scan against the token-by-token
recurrence; one state slot per request whatever its length; idle means free."""
from __future__ import annotations


import pytest
import torch

from llmserve.errors import InvalidRequestError
from llmserve.model.mamba2 import ssd_scan
from llmserve.sampling_params import SamplingParams
from test_engine import assert_idle
from tiny_models import (BOS_ID, EOS_ID, VOCAB_SIZE, greedy, hf_greedy, make_llm, make_model_folder,
                         move_mid_generation, random_prompts, run_to_idle)

STEPS = 64


def mamba2_config():
    from transformers import Mamba2Config

    # 4 heads of 16 in 2 groups, state 16, conv 4, chunks of 16 (prompts run several)
    return Mamba2Config(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16,
                        expand=2, state_size=16, n_groups=2, conv_kernel=4, chunk_size=16, bos_token_id=BOS_ID,
                        eos_token_id=EOS_ID, pad_token_id=0, tie_word_embeddings=False, initializer_range=0.2)


@pytest.fixture(scope="module")
def mamba(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mamba2")
    hf = make_model_folder(folder, mamba2_config(), seed=5)
    with torch.no_grad():  # HF's init leaves D at 1 and dt_bias in a narrow band: spread them
        g = torch.Generator().manual_seed(9)
        for layer in hf.backbone.layers:
            layer.mixer.D.copy_(torch.randn(layer.mixer.D.shape, generator=g))
            layer.mixer.dt_bias.copy_(torch.randn(layer.mixer.dt_bias.shape, generator=g) - 1)
    hf.save_pretrained(folder)
    return folder, hf


def test_ssd_scan_equals_the_recurrence():
    g = torch.Generator().manual_seed(0)
    L, H, P, N = 37, 3, 4, 5
    x, B, C = torch.randn(L, H, P, generator=g), torch.randn(L, H, N, generator=g), torch.randn(L, H, N, generator=g)
    dt = torch.rand(L, H, generator=g) * 0.5
    A = -torch.rand(H, generator=g) * 2
    h0 = torch.randn(H, P, N, generator=g)
    h, want = h0.clone(), []
    for t in range(L):  # h_t = exp(dt A) h_{t-1} + dt x_t B_t^T; y_t = h_t C_t
        h = h * torch.exp(dt[t] * A)[:, None, None] + (dt[t][:, None] * x[t])[..., None] * B[t][:, None, :]
        want.append(torch.einsum("hpn,hn->hp", h, C[t]))
    for chunk in (1, 8, 16, 64):
        y, final = ssd_scan(x, dt, A, B, C, chunk, h0)
        torch.testing.assert_close(y, torch.stack(want), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(final, h, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("budget,seqs", [(7, 256), (64, 256), (64, 2)], ids=["chunk7", "chunk64", "two-slots"])
def test_greedy_equals_transformers(mamba, budget, seqs):
    folder, hf = mamba
    prompts = random_prompts(5, [5, 40, 17, 70, 1], seed=11)
    want = [hf_greedy(hf, p, STEPS)[0] for p in prompts]
    llm = make_llm(folder, max_num_batched_tokens=budget, max_num_seqs=seqs)
    outs = llm.generate(prompts, greedy(STEPS), use_tqdm=False)
    for i, (o, w) in enumerate(zip(outs, want)):
        assert o.outputs[0].token_ids == w, f"prompt {i} differs from transformers"
    engine = llm.engine
    assert engine.kv.num_state_slots == seqs and engine.kv.prefix_hits == 0
    assert_idle(engine)
    assert not engine.kv.state_slots and len(engine.kv._free_slots) == seqs


def test_preempted_requests_recompute_their_state(mamba):
    folder, hf = mamba
    prompts = random_prompts(4, [30, 12, 50, 8], seed=12)
    want = [hf_greedy(hf, p, 32)[0] for p in prompts]
    engine = make_llm(folder, max_num_batched_tokens=16, max_num_seqs=4).engine
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, greedy(32))
    engine.step()
    engine.step()
    victim = engine.scheduler.running[-1]
    engine.scheduler._preempt(victim)  # as memory pressure would: its slot goes, it recomputes
    assert victim.request_id not in engine.kv.state_slots
    outs = run_to_idle(engine)
    assert [outs[str(i)].outputs[0].token_ids for i in range(4)] == want
    assert_idle(engine)


def test_state_per_request_is_the_same_at_10_and_at_2000_tokens(mamba):
    folder, _ = mamba
    engine = make_llm(folder, max_num_seqs=4).engine
    runner = engine.runner
    per_slot = sum(t[0].numel() * t.element_size() for pair in runner.state_caches for t in pair)
    assert not runner.kv_pages and engine.kv.tables == []  # no attention: no KV blocks
    engine.add_request("r", random_prompts(1, [10], seed=3)[0], greedy(1990))
    seen = set()
    while engine.has_unfinished_requests():
        engine.step()
        if engine.scheduler.running:
            req = engine.scheduler.running[0]
            seen.add(req.num_computed_tokens)
            assert len(engine.kv.state_slots) == 1 and not any(engine.kv.tables)
            assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks
    assert {10, 1998} <= seen
    # the memory a request holds is its slot: the same bytes at 10 and at 2,000 tokens
    assert per_slot == sum(spec.bytes_per_slot(torch.float32) for spec in runner.state_specs)
    assert_idle(engine)


@pytest.mark.parametrize("with_kv", [True, False])
def test_a_request_moved_mid_generation_continues_exactly(mamba, with_kv):
    folder, hf = mamba
    prompt = random_prompts(1, [25], seed=14)[0]
    want = hf_greedy(hf, prompt, 40)[0]
    src, dst = make_llm(folder).engine, make_llm(folder).engine
    dst.add_request("other", random_prompts(1, [9], seed=15)[0], greedy(30))  # the slot 0 is someone else's
    dst.step()
    src.add_request("r", prompt, greedy(40))
    state = move_mid_generation(src, dst, "r", 20, with_kv=with_kv)
    if with_kv:
        assert len(state["kv"][0].states) == 2 * 2  # conv and SSM state of both layers
    assert run_to_idle(dst)["r"].outputs[0].token_ids == want
    assert_idle(src)
    assert_idle(dst)


def test_state_wiped_on_free(mamba):
    folder, _ = mamba
    engine = make_llm(folder, wipe_kv_on_free=True, max_num_seqs=2).engine
    engine.add_request("r", random_prompts(1, [20], seed=16)[0], greedy(4))
    while engine.has_unfinished_requests():
        engine.step()
    engine.step()  # the wipe runs at the next step
    for conv, ssm in engine.runner.state_caches:
        assert not conv.any() and not ssm.any()


def test_what_state_layers_cannot_do_is_refused(mamba):
    folder, _ = mamba
    with pytest.raises(InvalidRequestError, match="state-space"):
        make_llm(folder, speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    llm = make_llm(folder)
    with pytest.raises(InvalidRequestError, match="state-space"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, kv_policy="streaming", kv_budget=8), use_tqdm=False)
    assert_idle(llm.engine)
