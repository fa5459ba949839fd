"""KV groups by layer kind (model/specs.py, engine/kv_cache.py): sliding-window layers give back
the blocks that fall out of their window, so a request holds window + one block of KV for them
however long it grows, while full-attention layers keep everything; outputs stay equal to
transformers' through prefix hits, preemption and a move between engines; idle means free in
every group."""
from __future__ import annotations


import pytest

from llmserve.engine.block_pool import NULL_BLOCK
from llmserve.errors import InvalidRequestError
from llmserve.model.arch_config import FULL, SLIDING
from llmserve.model.specs import FullAttentionSpec, kv_layout
from test_engine import assert_idle
from tiny_models import (BOS_ID, EOS_ID, VOCAB_SIZE, greedy, hf_greedy, make_llm, make_model_folder,
                         move_mid_generation, random_prompts, run_to_idle)

WINDOW = 16
BLOCK = 4
COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
              initializer_range=0.2)


def gemma3_config():
    from transformers import Gemma3TextConfig

    # 2 local : 1 global, twice: groups of two layers (one full, two window) over two page tensors
    return Gemma3TextConfig(**COMMON, num_hidden_layers=6, head_dim=32, sliding_window=WINDOW,
                            layer_types=[SLIDING, SLIDING, FULL] * 2, query_pre_attn_scalar=24,
                            rope_parameters={SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
                                             FULL: {"rope_type": "default", "rope_theta": 1000000.0}},
                            tie_word_embeddings=True)


def mistral_config():
    from transformers import MistralConfig

    return MistralConfig(**COMMON, num_hidden_layers=2, head_dim=16, sliding_window=WINDOW, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kv-groups-gemma3")
    return folder, make_model_folder(folder, gemma3_config(), seed=3)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kv-groups-mistral")
    return folder, make_model_folder(folder, mistral_config(), seed=4)


def held_tokens(engine, rid: str) -> list[int]:
    """Per group, the context positions whose blocks the request still holds (its computed tokens
    from its first held block on)."""
    req = next(r for r in engine.scheduler.running if r.request_id == rid)
    out = []
    for tables in engine.kv.tables:
        table = tables[rid]
        dropped = sum(1 for b in table if b is NULL_BLOCK)
        assert NULL_BLOCK not in table[dropped:], "a dropped block in the middle of a table"
        out.append(req.num_computed_tokens - dropped * BLOCK)
    return out


def test_layout_groups_layers_by_kind():
    full, local = FullAttentionSpec(2, 32), FullAttentionSpec(2, 32, WINDOW)
    layout = kv_layout([local, local, full, local, local, full])
    assert layout.windows == (None, WINDOW, WINDOW)
    assert layout.group_layers == ((2, 5), (0, 1), (3, 4))
    assert layout.page_of_layer == (0, 1, 0, 0, 1, 1)  # each group's layers on pages 0 and 1
    assert len(layout.page_specs) == 2
    # 100 tokens: 25 blocks of 4 in the full group; a window group holds its window and a chunk
    # of 8: ceil((16 - 1 + 8) / 4) + 1 = 7 blocks each.
    assert layout.blocks_per_request(100, BLOCK, 8) == 25 + 2 * 7
    assert layout.max_tokens(39, BLOCK, 8) == 100
    assert layout.max_tokens(38, BLOCK, 8) == 96
    one_kind = kv_layout([full] * 3)
    assert one_kind.windows == (None,) and one_kind.page_of_layer == (0, 1, 2)
    only_windows = kv_layout([local] * 2)
    assert only_windows.num_groups == 1
    assert only_windows.max_tokens(7, BLOCK, 8) is None  # a request holds at most 7 blocks however long
    assert only_windows.max_tokens(6, BLOCK, 8) == 0
    with pytest.raises(Exception, match="different KV shapes"):
        kv_layout([local, FullAttentionSpec(2, 16)])


@pytest.mark.parametrize("model", ["gemma", "mistral"])
def test_window_layers_hold_the_window_and_a_block_as_a_request_grows(model, request):
    folder, hf = request.getfixturevalue(model)
    prompt = random_prompts(1, [20], seed=5)[0]
    want = hf_greedy(hf, prompt, 5 * WINDOW)[0]
    engine = make_llm(folder, block_size=BLOCK, num_kv_blocks=200).engine
    windows = engine.kv.windows
    engine.add_request("r", prompt, greedy(5 * WINDOW))
    peaks = [0] * len(windows)
    while engine.has_unfinished_requests():
        out = engine.step()
        if engine.scheduler.running:
            req = engine.scheduler.running[0]
            for g, (w, held) in enumerate(zip(windows, held_tokens(engine, "r"))):
                if w is None:
                    assert held == req.num_computed_tokens
                else:
                    assert held <= WINDOW + BLOCK
                    peaks[g] = max(peaks[g], held)
        for o in out:
            if o.finished:
                assert o.outputs[0].token_ids == want
    assert all(peak > WINDOW for w, peak in zip(windows, peaks) if w is not None)  # it did grow past the window
    assert_idle(engine)


def test_per_request_memory_of_a_window_model_is_the_same_at_20_and_at_200_tokens(mistral):
    folder, _ = mistral
    engine = make_llm(folder, block_size=BLOCK, num_kv_blocks=64, max_num_batched_tokens=16).engine
    engine.add_request("r", random_prompts(1, [20], seed=6)[0], greedy(180))
    used = {}
    while engine.has_unfinished_requests():
        engine.step()
        if engine.scheduler.running:
            n = engine.scheduler.running[0].num_computed_tokens
            used[n] = engine.kv.pool.num_blocks - engine.kv.num_free_blocks
    # 200 tokens of a full-attention model would take 50 blocks; a window model holds 5 or 6.
    assert max(used[n] for n in used if n >= 20) <= -(-WINDOW // BLOCK) + 2
    assert used[21] == used[197]  # the same place in a block: the same blocks held
    assert_idle(engine)


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("budget,blocks", [(7, 400), (64, 400), (7, 44)], ids=["chunk7", "chunk64", "preempting"])
def test_greedy_equals_transformers_with_window_groups(gemma, budget, blocks, caching):
    folder, hf = gemma
    prompts = random_prompts(4, [70, 5, 45, 33], seed=8)
    prompts.append(prompts[0][:60] + [7, 7, 7])  # shares 15 blocks with the first, far past the window
    want = [hf_greedy(hf, p, 40)[0] for p in prompts]
    llm = make_llm(folder, block_size=BLOCK, num_kv_blocks=blocks, max_num_batched_tokens=budget,
                   enable_prefix_caching=caching)
    outs = llm.generate(prompts, greedy(40), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
    if caching and blocks == 400:
        assert llm.engine.kv.prefix_hits >= 60
    if blocks == 44:
        assert llm.engine.max_model_len >= 110  # the longest request fits alone
        assert llm.engine.scheduler.num_preemptions > 0
    assert_idle(llm.engine)


def test_a_prefix_hit_takes_only_the_window_blocks_it_reads(gemma):
    folder, hf = gemma
    engine = make_llm(folder, block_size=BLOCK, num_kv_blocks=200).engine
    first = random_prompts(1, [64], seed=9)[0]
    engine.add_request("a", first, greedy(1))
    while engine.has_unfinished_requests():
        engine.step()
    second = first + [5, 6, 7]
    engine.add_request("b", second, greedy(8))
    engine.step()
    # 16 blocks of 4 are cached; the next query (position 64) reads positions 49.. in a window group.
    assert engine.kv.prefix_hits == 64
    first_read = (64 - WINDOW + 1) // BLOCK
    for w, table in zip(engine.kv.windows, (t["b"] for t in engine.kv.tables)):
        dropped = first_read if w is not None else 0
        assert all(b is NULL_BLOCK for b in table[:dropped]) and NULL_BLOCK not in table[dropped:]
    while engine.has_unfinished_requests():
        out = engine.step()
    assert out[0].outputs[0].token_ids == hf_greedy(hf, second, 8)[0]
    assert_idle(engine)


@pytest.mark.parametrize("with_kv", [True, False])
def test_a_window_model_request_moved_mid_generation_continues_exactly(gemma, with_kv):
    folder, hf = gemma
    prompt = random_prompts(1, [30], seed=10)[0]
    want = hf_greedy(hf, prompt, 40)[0]
    src = make_llm(folder, block_size=BLOCK).engine
    dst = make_llm(folder, block_size=BLOCK).engine
    src.add_request("r", prompt, greedy(40))
    state = move_mid_generation(src, dst, "r", 20, with_kv=with_kv)
    if with_kv:  # the blocks the window groups dropped travel as zeros
        kv = state["kv"][0].groups
        assert len(kv) == len(src.kv.windows)
        assert all(bool((g[:, :, :WINDOW] == 0).all()) for g, w in zip(kv, src.kv.windows) if w is not None)
    assert_idle(src)
    if with_kv:  # taken back in as computed: the window groups hold only what they read
        held = held_tokens(dst, "r")
        assert all(h <= WINDOW + BLOCK for h, w in zip(held, dst.kv.windows) if w is not None)
    assert run_to_idle(dst)["r"].outputs[0].token_ids == want
    assert_idle(dst)


def test_kv_sized_by_groups_holds_longer_contexts(gemma):
    """The same KV budget in blocks holds a longer request when window layers keep only their window."""
    folder, _ = gemma
    llm = make_llm(folder, block_size=BLOCK, num_kv_blocks=60, max_num_batched_tokens=8)
    # 60 blocks: the full group takes one per 4 tokens, each window group at most 7 -> 184 tokens.
    assert llm.engine.max_model_len == 184
    prompt = random_prompts(1, [150], seed=12)[0]
    out = llm.generate([prompt], greedy(30), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 30
    assert_idle(llm.engine)


def test_without_kv_groups_every_layer_keeps_every_token_with_the_same_outputs(gemma):
    folder, hf = gemma
    prompt = random_prompts(1, [40], seed=13)[0]
    engine = make_llm(folder, block_size=BLOCK, kv_groups=False).engine
    assert engine.kv.windows == (None,) and len(engine.runner.kv_pages) == 6
    engine.add_request("r", prompt, greedy(30))
    out = None
    while engine.has_unfinished_requests():
        out = engine.step() or out
        if engine.scheduler.running:
            assert held_tokens(engine, "r") == [engine.scheduler.running[0].num_computed_tokens]
    assert out[0].outputs[0].token_ids == hf_greedy(hf, prompt, 30)[0]
    assert_idle(engine)


def test_draft_models_refuse_window_layers(gemma):
    folder, _ = gemma
    with pytest.raises(InvalidRequestError, match="ngram"):
        make_llm(folder, speculative_config={"method": "self_early_exit", "num_speculative_tokens": 2})
