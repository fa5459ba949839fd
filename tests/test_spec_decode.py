"""Speculative decoding, greedy: every proposer leaves the outputs exactly those of the model alone
(transformers is the reference), through chunked prefill, prefix caching, preemption, n > 1,
logprobs and stops that land inside an accepted run; and the KV cache is all free afterwards."""
from __future__ import annotations

import pytest

from llmserve.sampling_params import SamplingParams
from test_engine import assert_idle, greedy
from tiny_models import (hf_greedy, llama_config, make_llm, make_model_folder, make_successor_model,
                         random_prompts, successor_chain)

METHODS = ("ngram", "self_quantized", "self_early_exit", "draft_model")
CYCLE = list(b"abcdefgh")


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec-target")
    hf = make_model_folder(path, llama_config(num_hidden_layers=3), seed=5)
    return path, hf


@pytest.fixture(scope="module")
def prompts():
    # Random prompts, and one that repeats itself (prompt lookup finds it).
    return random_prompts(4, [3, 17, 29, 40], seed=2) + [[40, 41, 42, 43, 44, 45] * 4]


@pytest.fixture(scope="module")
def refs(target, prompts):
    _, hf = target
    return [hf_greedy(hf, p, 24)[0] for p in prompts]


def spec(method: str, folder, **kw) -> dict:
    # Fixed draft lengths unless a test says otherwise: adaptive ones follow measured step times,
    # and these tests check exactness, not timing.
    conf = {"method": method, "num_speculative_tokens": 4, "adaptive": False}
    if method == "ngram":
        conf["prompt_lookup_min"] = 1
    elif method == "self_early_exit":
        conf["num_layers"] = 1
    elif method == "draft_model":
        conf["model"] = str(folder)  # the target itself: every draft is accepted, bonus tokens included
    conf.update(kw)
    return conf


@pytest.mark.parametrize("budget", [7, 64])
@pytest.mark.parametrize("method", METHODS)
def test_greedy_outputs_equal_the_reference(target, prompts, refs, method, budget):
    folder, _ = target
    llm = make_llm(folder, speculative_config=spec(method, folder), max_num_batched_tokens=budget)
    for attempt in range(2):  # the second pass hits the prefix cache the first one filled
        outs = llm.generate(prompts, greedy(24), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == refs
    stats = llm.engine.stats()
    assert stats["prefix_cache_hits"] > 0
    assert stats["spec_decode_num_drafts"] > 0 and stats["spec_decode_num_draft_tokens"] >= stats["spec_decode_num_drafts"]
    if method in ("draft_model", "self_quantized"):
        assert stats["spec_decode_num_accepted_tokens"] > 0
    if method == "draft_model":  # the target as its own draft: its KV kept right, every draft is accepted
        assert stats["spec_decode_num_accepted_tokens"] >= 0.95 * stats["spec_decode_num_draft_tokens"]
    assert_idle(llm.engine)


@pytest.mark.parametrize("method", METHODS)
def test_preemption_under_a_tiny_kv_budget(target, prompts, refs, method):
    folder, _ = target
    llm = make_llm(folder, speculative_config=spec(method, folder), num_kv_blocks=9, block_size=8)
    outs = llm.generate(prompts, greedy(24), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == refs
    stats = llm.engine.stats()
    assert stats["num_preemptions"] > 0 and stats["spec_decode_num_drafts"] > 0
    if method == "draft_model":  # a preempted request's draft KV is recomputed, not trusted
        assert stats["spec_decode_num_accepted_tokens"] >= 0.95 * stats["spec_decode_num_draft_tokens"]
    assert_idle(llm.engine)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_n_greater_than_one_and_logprobs_equal_the_target(target, prompts, refs, method):
    folder, _ = target
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, n=2, logprobs=3)
    plain = make_llm(folder).generate(prompts, params, use_tqdm=False)
    llm = make_llm(folder, speculative_config=spec(method, folder))
    outs = llm.generate(prompts, params, use_tqdm=False)
    stats = llm.engine.stats()
    assert stats["spec_decode_num_accepted_tokens"] > 0
    # Per request, as RequestOutput reports them (counts only), adding up to the engine's.
    assert sum(o.num_accepted_tokens for o in outs) == stats["spec_decode_num_accepted_tokens"]
    assert sum(o.num_draft_tokens for o in outs) == stats["spec_decode_num_draft_tokens"]
    for out, ref, base in zip(outs, refs, plain):
        for comp, base_comp in zip(out.outputs, base.outputs):
            assert comp.token_ids == ref
            assert len(comp.logprobs) == len(ref)
            for lp, base_lp in zip(comp.logprobs, base_comp.logprobs):
                assert lp.keys() == base_lp.keys()
                for tok, (value, rank) in lp.items():
                    assert rank == base_lp[tok][1] and value == pytest.approx(base_lp[tok][0], abs=1e-4)
            assert comp.cumulative_logprob == pytest.approx(base_comp.cumulative_logprob, abs=1e-3)
    assert_idle(llm.engine)


@pytest.fixture(scope="module")
def cycle(tmp_path_factory):
    """A model that writes "abcdefgh" over and over: prompt lookup drafts it all after one round."""
    path = tmp_path_factory.mktemp("spec-cycle")
    make_successor_model(path, successor_chain(CYCLE, then=CYCLE[0]))
    return path


def _record_runs(engine) -> list[tuple[int, int]]:
    """(tokens the step brought, tokens appended) of every verify run, as the update point saw them."""
    runs = []
    update = engine.scheduler.update

    def recording(out, sampled=(), *rest):
        before = {id(s.request): s.request.num_output_tokens for s in sampled}
        changed = update(out, sampled, *rest)
        runs.extend((len(s.token_ids), s.request.num_output_tokens - before[id(s.request)])
                    for s in sampled if s.num_draft)
        return changed

    engine.scheduler.update = recording
    return runs


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
@pytest.mark.parametrize("stop,max_tokens", [("cdefghabcdefghabcd", 60), (None, 29)])
def test_stop_string_and_max_tokens_inside_an_accepted_run(cycle, method, stop, max_tokens):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                            stop=[stop] if stop else None)
    plain = make_llm(cycle).generate([CYCLE[:2]], params, use_tqdm=False)[0].outputs[0]
    llm = make_llm(cycle, speculative_config=spec(method, cycle))
    runs = _record_runs(llm.engine)
    out = llm.generate([CYCLE[:2]], params, use_tqdm=False)[0].outputs[0]
    assert (out.text, out.token_ids, out.finish_reason, out.stop_reason) == (
        plain.text, plain.token_ids, plain.finish_reason, plain.stop_reason)
    assert out.finish_reason == ("stop" if stop else "length") and len(out.token_ids) <= max_tokens
    assert sum(brought - 1 for brought, _ in runs) > 0  # drafts were accepted
    if stop:
        assert runs[-1][1] < runs[-1][0]  # the last run was cut short by the stop string
    assert_idle(llm.engine)


def test_idle_after_a_speculative_workload_wipes_the_draft_kv(target, prompts):
    folder, _ = target
    llm = make_llm(folder, speculative_config=spec("self_quantized", folder), wipe_kv_on_free=True)
    llm.generate(prompts, greedy(16), use_tqdm=False)
    assert llm.engine.stats()["spec_decode_num_drafts"] > 0
    assert_idle(llm.engine)
    for k, v in llm.engine.proposer.kv_caches:  # the draft's own KV is zeroed with the target's
        assert not k.any() and not v.any()
    for k, v in llm.engine.runner.kv_caches:
        assert not k.any() and not v.any()


def test_speculation_backs_off_under_load(target, prompts, refs):
    folder, _ = target
    # Five running requests and room for four tokens of decodes plus drafts: no drafts at all.
    llm = make_llm(folder, speculative_config=spec("ngram", folder, max_batch_tokens=4))
    outs = llm.generate(prompts, greedy(24), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert llm.engine.stats()["spec_decode_num_drafts"] < 5  # only while the batch was draining
    alone = make_llm(folder, speculative_config=spec("ngram", folder, max_batch_tokens=4))
    alone.generate(prompts[-1:], greedy(24), use_tqdm=False)
    assert alone.engine.stats()["spec_decode_num_drafts"] > 0


def test_no_speculation_leaves_the_default_path_alone(target, prompts, refs):
    folder, _ = target
    llm = make_llm(folder)
    assert llm.engine.proposer is None
    outs = llm.generate(prompts, greedy(24), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert llm.engine.stats()["spec_decode_num_drafts"] == 0


@pytest.mark.parametrize("method", ["draft_model", "self_quantized"])
@pytest.mark.parametrize("penalty", [dict(repetition_penalty=1.5), dict(frequency_penalty=1.0),
                                     dict(frequency_penalty=-1.0, presence_penalty=0.5)])
def test_penalties_see_the_drafts_before_each_position(target, prompts, method, penalty):
    """A draft position's penalties count the drafts before it: the drafts ignore penalties, the
    target's tokens depend on them, and outputs stay those of the model alone."""
    folder, _ = target
    params = SamplingParams(temperature=0.0, max_tokens=30, **penalty)
    plain = make_llm(folder).generate(prompts, params, use_tqdm=False)
    llm = make_llm(folder, speculative_config=spec(method, folder))
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [b.outputs[0].token_ids for b in plain]
    assert llm.engine.stats()["spec_decode_num_accepted_tokens"] > 0


def test_grammar_requests_do_not_speculate_and_the_rest_do():
    """Documented choice: a structured-output request gets no drafts (its matcher only ever sees
    accepted tokens); plain requests beside it still speculate."""
    import re

    from llmserve.structured import StructuredOutputsParams
    from server_fixtures import tiny_model_path

    llm = make_llm(tiny_model_path(), speculative_config={"method": "ngram", "prompt_lookup_min": 1,
                                                          "adaptive": False})
    grammar = SamplingParams(temperature=0.0, max_tokens=60,
                             structured_outputs=StructuredOutputsParams(regex=r"(ab ){3,6}c"))
    out = llm.generate(["ab ab ab ab"], grammar, use_tqdm=False)[0].outputs[0]
    assert re.fullmatch(r"(ab ){3,6}c", out.text) and out.finish_reason == "stop"
    assert llm.engine.stats()["spec_decode_num_drafts"] == 0
    llm.generate(["ab ab ab ab"], greedy(30), use_tqdm=False)
    assert llm.engine.stats()["spec_decode_num_drafts"] > 0
    assert_idle(llm.engine)


def test_a_long_draft_catch_up_is_spread_over_steps(target, prompts, refs, monkeypatch):
    from llmserve.spec import model_draft

    monkeypatch.setattr(model_draft, "MAX_CATCHUP", 5)  # prompts of up to 40 tokens catch up in steps
    folder, _ = target
    llm = make_llm(folder, speculative_config=spec("draft_model", folder))
    outs = llm.generate(prompts, greedy(24), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == refs
    stats = llm.engine.stats()  # the target as its own draft: the caught-up KV is right, drafts all accepted
    assert stats["spec_decode_num_accepted_tokens"] >= 0.95 * stats["spec_decode_num_draft_tokens"] > 0
    assert_idle(llm.engine)


def test_early_exit_reads_the_targets_kv(cycle):
    """In the cycle model every layer adds nothing to the residual stream, so its first layer with
    the final norm and head is the whole model: each early-exit draft is accepted, bonus tokens too."""
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    plain = make_llm(cycle).generate([CYCLE[:3]], params, use_tqdm=False)[0].outputs[0].token_ids
    llm = make_llm(cycle, speculative_config=spec("self_early_exit", cycle))
    out = llm.generate([CYCLE[:3]], params, use_tqdm=False)[0].outputs[0].token_ids
    assert out == plain
    stats = llm.engine.stats()
    assert stats["spec_decode_num_accepted_tokens"] == stats["spec_decode_num_draft_tokens"] > 0
    assert stats["spec_decode_num_drafts"] <= 40 // 5 + 1  # four drafts and a bonus token a step
    assert_idle(llm.engine)


def test_the_runners_rows_follow_the_block_tables(target, prompts, refs):
    """Regression: draft blocks must never leave the runner's persistent rows pointing at blocks
    the request no longer holds (a small pool hands freed blocks out again at once)."""
    folder, _ = target
    llm = make_llm(folder, speculative_config=spec("self_early_exit", folder), num_kv_blocks=40, block_size=8)
    engine, batch = llm.engine, llm.engine.runner.batch
    step = engine.step

    def checked_step():
        outs = step()
        for req in engine.scheduler.running:
            row = batch.row_of.get(req.request_id)
            ids = engine.kv.block_ids(req.request_id)
            if row is not None and batch.num_blocks[0, row] == len(ids):
                assert batch.block_tables[0][row, :len(ids)].tolist() == ids
        return outs

    engine.step = checked_step
    outs = llm.generate(prompts, greedy(24), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert_idle(engine)


@pytest.mark.parametrize("with_kv", [True, False])
def test_a_speculating_request_moves_between_engines(target, prompts, refs, with_kv):
    """Export mid-run from an engine that speculates (drafts pending, draft blocks held), import
    into one that does not: the request ends exactly as the model alone ends it."""
    import pickle

    folder, _ = target
    src = make_llm(folder, speculative_config=spec("draft_model", folder)).engine
    dst = make_llm(folder).engine
    src.add_request("r", prompts[2], greedy(24))
    while src.groups["r"].seqs[0].num_output_tokens < 8:
        src.step()
    assert src.stats()["spec_decode_num_accepted_tokens"] > 0
    state = pickle.loads(pickle.dumps(src.export_request("r", with_kv=with_kv)))
    dst.import_request(state)
    out = None
    while dst.has_unfinished_requests():
        for o in dst.step():
            out = o
    assert out.outputs[0].token_ids == refs[2]
    assert_idle(src)
    assert_idle(dst)


@pytest.mark.parametrize("method", ["ngram", "self_quantized"])
def test_adaptive_draft_lengths_keep_outputs_exact(target, prompts, refs, method):
    """Draft lengths that follow measured step times and acceptance (whatever they come to on this
    machine) change how many tokens a step verifies, never which tokens come out."""
    folder, _ = target
    llm = make_llm(folder, speculative_config=spec(method, folder, adaptive=True), max_num_batched_tokens=7)
    for _ in range(2):
        outs = llm.generate(prompts, greedy(24), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == refs
    assert_idle(llm.engine)
