"""The engine core's shape: one update point, blocks published only after their KV is written,
requests that move between engines, a failed step that fails only its requests, content-free reprs."""
from __future__ import annotations

import pickle
import time

import pytest

from llmserve.engine.engine import RequestGroup
from llmserve.engine.request import RequestStatus
from llmserve.engine.scheduler import SampledTokens, SchedulerOutput
from llmserve.sampling.metadata import SamplingRow
from llmserve.sampling_params import SamplingParams
from test_engine import assert_idle, greedy
from tiny_models import (byte_tokenizer, llama_config, make_llm, make_model_folder, move_mid_generation,
                         random_prompts, run_to_idle)

PRIVATE = [211, 173, 199, 137, 241, 158]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("core-llama")
    make_model_folder(path, llama_config(), seed=11)
    return path


def _admit_and_prefill(engine, rid: str, prompt: list[int], params: SamplingParams) -> None:
    engine.add_request(rid, prompt, params)
    while not engine.groups[rid].seqs[0].output_token_ids:
        engine.step()


# ---- the update point -------------------------------------------------------------------------

def test_update_appends_several_tokens_and_cuts_at_a_stop(folder):
    engine = make_llm(folder).engine
    params = SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[7], min_tokens=3)
    _admit_and_prefill(engine, "a", random_prompts(1, [9], seed=1)[0], params)
    req = engine.groups["a"].seqs[0]
    before = list(req.output_token_ids)
    # One token is out; 7 stops only once min_tokens (3) are out: the first 7 is the second token.
    engine.scheduler.update(SchedulerOutput(), [SampledTokens(req, [7, 5, 7, 9, 9])])
    assert req.output_token_ids == before + [7, 5, 7]  # cut right at the stop token
    assert req.status is RequestStatus.FINISHED_STOPPED and req.stop_reason == 7
    assert req.request_id not in engine.kv.block_tables  # freed by the update point
    engine.abort_request("a")
    assert_idle(engine)


def test_update_cuts_a_run_at_max_tokens(folder):
    engine = make_llm(folder).engine
    _admit_and_prefill(engine, "a", random_prompts(1, [9], seed=2)[0], greedy(4))
    req = engine.groups["a"].seqs[0]
    engine.scheduler.update(SchedulerOutput(), [SampledTokens(req, [3, 3, 3, 3, 3, 3])])
    assert req.num_output_tokens == 4 and req.status is RequestStatus.FINISHED_LENGTH
    engine.abort_request("a")
    assert_idle(engine)


# ---- prefix blocks are published after their KV is written ------------------------------------

def test_blocks_enter_the_prefix_index_only_after_the_forward(folder):
    engine = make_llm(folder, block_size=4).engine
    prompt = random_prompts(1, [17], seed=3)[0]
    engine.add_request("a", prompt, greedy(3))
    sched = engine.scheduler.schedule()
    assert sched.scheduled and not engine.kv.pool._cached  # allocated, not yet written: not published
    engine.runner.execute(sched, engine.kv.tables)
    assert not engine.kv.pool._cached
    engine.scheduler.update(sched)
    assert len(engine.kv.pool._cached) == 4  # 16 of 17 tokens fill 4 blocks
    engine.abort_request("a")
    assert_idle(engine)


def test_truncate_rolls_a_table_back_unpublished(folder):
    engine = make_llm(folder, block_size=4).engine
    kv = engine.kv
    engine.add_request("a", random_prompts(1, [6], seed=4)[0], greedy(3))
    req = engine.groups["a"].seqs[0]
    assert kv.allocate(req, 14)  # the prompt and 8 draft positions: 4 blocks
    assert len(kv.block_ids("a")) == 4
    kv.truncate(req, 6)
    kv.end_step()
    assert len(kv.block_ids("a")) == 2 and kv.num_free_blocks == kv.pool.num_blocks - 2
    assert not kv.pool._cached
    engine.abort_request("a")
    assert_idle(engine)


def test_same_prompt_arriving_together_is_computed_once(folder):
    """n > 1 (and clients sharing a prompt) wait a step for the blocks in flight, then hit them."""
    engine = make_llm(folder, block_size=4).engine
    prompt = random_prompts(1, [33], seed=5)[0]
    engine.add_request("g", prompt, SamplingParams(n=3, temperature=0, max_tokens=4, ignore_eos=True))
    out = run_to_idle(engine)["g"]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 1
    assert engine.kv.prefix_hits == 2 * 32  # the second and third sequence hit all 8 full blocks
    assert_idle(engine)


# ---- movable requests ---------------------------------------------------------------------------

@pytest.mark.parametrize("with_kv", [True, False])
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2),
    SamplingParams(temperature=0.9, top_p=0.95, seed=99, max_tokens=24, ignore_eos=True, logprobs=1),
    SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=24, ignore_eos=True),
], ids=["greedy", "seeded", "seeded-n2"])
def test_request_moved_mid_generation_continues_exactly(folder, params, with_kv):
    prompt = random_prompts(1, [21], seed=6)[0]
    others = random_prompts(3, [5, 30, 12], seed=7)
    stay = make_llm(folder).engine
    stay.add_request("r", prompt, params)
    expected = run_to_idle(stay)["r"]

    src, dst = make_llm(folder).engine, make_llm(folder).engine
    src.add_request("r", prompt, params)
    for i, p in enumerate(others):  # company in the batch on both sides
        src.add_request(f"s{i}", p, greedy(30))
        dst.add_request(f"d{i}", p, greedy(5))
    move_mid_generation(src, dst, "r", 10, with_kv=with_kv)
    assert "r" not in src.groups and "r" not in src.kv.block_tables
    moved = run_to_idle(dst)["r"]
    run_to_idle(src)
    for a, b in zip(moved.outputs, expected.outputs):
        assert a.token_ids == b.token_ids
        assert a.text == b.text
        if b.logprobs is not None:
            assert [list(p) for p in a.logprobs] == [list(p) for p in b.logprobs]
            assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-4)
    assert_idle(src)
    assert_idle(dst)


def test_request_state_reveals_nothing_in_its_repr(folder):
    engine = make_llm(folder).engine
    engine.add_request("r", PRIVATE * 3, SamplingParams(temperature=0, max_tokens=4, stop=["secret-stop"]))
    engine.step()
    group = engine.groups["r"]
    req = group.seqs[0]
    row = SamplingRow(req.params, PRIVATE, PRIVATE)
    for obj in (group, req, req.detok, row):
        text = repr(obj)
        assert not any(str(t) in text for t in PRIVATE), type(obj).__name__
        assert "secret-stop" not in text
    assert isinstance(group, RequestGroup)
    engine.abort_request("r")


# ---- scheduling ---------------------------------------------------------------------------------

def test_deadline_ranking_forgets_a_deadline_once_the_first_token_is_out(folder):
    engine = make_llm(folder, scheduling_policy="deadline").engine
    sched = engine.scheduler
    now = time.monotonic()
    engine.add_request("late", random_prompts(1, [5], seed=8)[0], greedy(50), deadline=now - 5.0)
    engine.add_request("free", random_prompts(1, [5], seed=9)[0], greedy(50))
    while any(not r.output_token_ids for r in sched.running) or sched.waiting:
        engine.step()
    late, free = engine.groups["late"].seqs[0], engine.groups["free"].seqs[0]
    # Both have their first token: the passed deadline no longer protects "late"; the later
    # arrival ("free") is not preempted first just for having no deadline.
    assert max(sched.running, key=sched._rank) is free
    engine.add_request("racing", random_prompts(1, [5], seed=10)[0], greedy(50), deadline=now + 60)
    racing = engine.groups["racing"].seqs[0]
    assert sched._rank(racing) < sched._rank(late)  # still racing its TTFT deadline: served first
    engine.abort_request(["late", "free", "racing"])
    assert_idle(engine)


# ---- a failed step -------------------------------------------------------------------------------

def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(folder):
    llm = make_llm(folder)
    engine = llm.engine
    prompt = random_prompts(1, [12], seed=11)[0]
    expected = llm.generate([prompt], greedy(6), use_tqdm=False)[0].outputs[0].token_ids
    engine.add_request("doomed", prompt, greedy(6))
    real = engine.runner.execute

    def broken(*args, **kwargs):
        raise RuntimeError("device error: " + str(PRIVATE))

    engine.runner.execute = broken
    outs = engine.step()
    engine.runner.execute = real
    assert [o.request_id for o in outs] == ["doomed"]
    assert outs[0].finished and outs[0].outputs[0].finish_reason == "error"
    assert engine.last_step_error == "RuntimeError"
    assert_idle(engine)
    again = llm.generate([prompt], greedy(6), use_tqdm=False)[0]
    assert again.outputs[0].token_ids == expected
    assert engine.last_step_error is None


def test_detokenizer_state_round_trips():
    from llmserve.engine.detokenizer import IncrementalDetokenizer

    tok = byte_tokenizer()
    ids = tok.encode("héllo wörld, stop here")
    a = IncrementalDetokenizer(tok, [], ["stop"])
    for t in ids[:5]:
        a.add(t)
    b = IncrementalDetokenizer.from_state(pickle.loads(pickle.dumps(a.to_state())), tok)
    for t in ids[5:]:
        assert a.add(t) == b.add(t)
    assert a.text == b.text and a.stop_string == b.stop_string == "stop"


# ---- the model registry and layer specs ----------------------------------------------------------

def test_registry_builds_each_architecture_and_names_the_supported_ones():
    from llmserve.errors import UnsupportedArchitectureError
    from llmserve.model.llama import LlamaForCausalLM
    from llmserve.model.registry import ARCHITECTURES, model_class

    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        assert model_class(name) is LlamaForCausalLM
    with pytest.raises(UnsupportedArchitectureError) as e:
        model_class("GPT2LMHeadModel")
    assert all(name in str(e.value) for name in ARCHITECTURES)


def test_kv_cache_follows_the_models_layer_specs(folder):
    from llmserve.model.linear import Projection
    from llmserve.model.specs import FullAttentionSpec

    engine = make_llm(folder, num_kv_blocks=8, block_size=4).engine
    model = engine.runner.model
    specs = model.kv_cache_specs()
    assert specs == [FullAttentionSpec(2, 16)] * 2
    for spec, (k, v) in zip(specs, engine.runner.kv_caches):
        assert k.shape == v.shape == (8 * 4, spec.num_kv_heads, spec.head_dim)
    # Every projection was built with its storage and has processed its weights: nothing float
    # is left behind beside the module that computes.
    projections = [m for m in model.modules() if isinstance(m, Projection)]
    assert len(projections) == 2 * 4 + 1
    assert all(p.impl is not None and p.weight is None for p in projections)


def test_engine_seed_makes_unseeded_sampling_reproducible(folder):
    prompts = random_prompts(3, [4, 9, 15], seed=12)
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)  # no per-request seed

    def tokens(seed: int) -> list[list[int]]:
        return [o.outputs[0].token_ids for o in make_llm(folder, seed=seed).generate(prompts, params, use_tqdm=False)]

    assert tokens(1) == tokens(1)
    assert tokens(1) != tokens(2)
