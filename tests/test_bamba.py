"""Bamba (model/bamba.py), a hybrid of Mamba-2 mixers and attention layers, against transformers
token for token: one request is served by two kinds of memory at once, its attention layers' KV
blocks and its mixers' state slot. Chunk budgets 7 and 64, a batch of mixed lengths, preemption
under a tiny KV budget and under few state slots, a move between engines; idle frees both."""
from __future__ import annotations


import pytest
import torch

from llmserve.model.arch_config import FULL, MAMBA, ArchConfig
from test_engine import assert_idle
from tiny_models import (BOS_ID, EOS_ID, VOCAB_SIZE, greedy, hf_greedy, make_llm, make_model_folder,
                         move_mid_generation, random_prompts, run_to_idle)

STEPS = 64


def bamba_config():
    from transformers import BambaConfig

    return BambaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[1, 3], mamba_n_heads=8,
                       mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
                       mamba_chunk_size=16, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=0,
                       tie_word_embeddings=False, initializer_range=0.2, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def bamba(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bamba")
    hf = make_model_folder(folder, bamba_config(), seed=6)
    with torch.no_grad():  # spread HF's uniform D and dt_bias
        g = torch.Generator().manual_seed(10)
        for layer in hf.model.layers:
            if layer.block_type == "linear_attention":
                layer.mamba.D.copy_(torch.randn(layer.mamba.D.shape, generator=g))
                layer.mamba.dt_bias.copy_(torch.randn(layer.mamba.dt_bias.shape, generator=g) - 1)
    hf.save_pretrained(folder)
    return folder, hf


def test_config_reads_the_layer_kinds(bamba):
    folder, _ = bamba
    cfg = ArchConfig.from_folder(folder)
    assert cfg.layer_types == (MAMBA, FULL, MAMBA, FULL)
    assert cfg.rotary_dim == cfg.head_dim // 2
    assert (cfg.mamba.num_heads, cfg.mamba.head_dim, cfg.mamba.state_size, cfg.mamba.n_groups) == (8, 16, 16, 2)


@pytest.mark.parametrize("budget,blocks,seqs", [(7, 256, 256), (64, 256, 256), (64, 12, 256), (64, 256, 2)],
                         ids=["chunk7", "chunk64", "preempting", "two-slots"])
def test_greedy_equals_transformers(bamba, budget, blocks, seqs):
    folder, hf = bamba
    prompts = random_prompts(5, [5, 40, 17, 70, 1], seed=21)
    want = [hf_greedy(hf, p, STEPS)[0] for p in prompts]
    llm = make_llm(folder, max_num_batched_tokens=budget, num_kv_blocks=blocks, max_num_seqs=seqs)
    engine = llm.engine
    assert len(engine.runner.kv_pages) == 2 and len(engine.runner.state_caches) == 2
    outs = llm.generate(prompts, greedy(STEPS), use_tqdm=False)
    for i, (o, w) in enumerate(zip(outs, want)):
        assert o.outputs[0].token_ids == w, f"prompt {i} differs from transformers"
    if blocks == 12:
        assert engine.scheduler.num_preemptions > 0
    assert_idle(engine)
    assert not engine.kv.state_slots


def test_one_request_holds_blocks_and_a_slot(bamba):
    folder, _ = bamba
    engine = make_llm(folder, block_size=16).engine
    engine.add_request("r", random_prompts(1, [40], seed=22)[0], greedy(30))
    engine.step()
    assert len(engine.kv.block_ids("r")) == 3 and "r" in engine.kv.state_slots
    while engine.has_unfinished_requests():
        engine.step()
    assert_idle(engine)
    assert not engine.kv.state_slots


@pytest.mark.parametrize("with_kv", [True, False])
def test_a_request_moved_mid_generation_continues_exactly(bamba, with_kv):
    folder, hf = bamba
    prompt = random_prompts(1, [33], seed=23)[0]
    want = hf_greedy(hf, prompt, 30)[0]
    src, dst = make_llm(folder).engine, make_llm(folder).engine
    dst.add_request("other", random_prompts(1, [9], seed=24)[0], greedy(20))
    dst.step()
    src.add_request("r", prompt, greedy(30))
    move_mid_generation(src, dst, "r", 12, with_kv=with_kv)
    assert run_to_idle(dst)["r"].outputs[0].token_ids == want
    assert_idle(src)
    assert_idle(dst)
