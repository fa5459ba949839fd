"""Scheduler policies: stall-free chunked prefill and deadline-aware admission."""
from __future__ import annotations

import time

import pytest

from llmserve.engine.request import RequestStatus
from llmserve.sampling_params import SamplingParams
from tiny_models import llama_config, make_llm, make_model_folder, random_prompts


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("sched-llama")
    make_model_folder(path, llama_config(max_position_embeddings=1024))
    return path


def test_long_prompt_never_stalls_running_decodes(folder):
    llm = make_llm(folder, max_num_batched_tokens=8, num_kv_blocks=128)
    engine = llm.engine
    short = random_prompts(2, [5, 6], seed=1)
    for i, p in enumerate(short):
        engine.add_request(f"s{i}", p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    while any(r.num_output_tokens == 0 for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    engine.add_request("long", random_prompts(1, [200], seed=2)[0], SamplingParams(temperature=0, max_tokens=2))
    for _ in range(10):
        before = {r.request_id: r.num_output_tokens for r in engine.scheduler.running if r.request_id.startswith("s")}
        sched = engine.scheduler.schedule()
        decodes = [s for s in sched.scheduled if s.request.request_id.startswith("s")]
        chunk = [s for s in sched.scheduled if s.request.request_id == "long"]
        # Both decodes get their token every step; the prompt gets what is left of the budget.
        assert len(decodes) == len(before) == 2
        assert chunk and chunk[0].num_new_tokens == 8 - 2
        engine.scheduler.update(sched)
        for s in decodes:  # stand in for the runner: feed a token so the decode goes on
            s.request.append_token(1)
    for rid in ("s0", "s1", "long"):
        engine.abort_request(rid)
    engine.step()
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks


def test_deadline_policy_admits_least_slack_first(folder):
    llm = make_llm(folder, scheduling_policy="deadline", max_num_seqs=1)
    engine = llm.engine
    now = time.monotonic()
    params = SamplingParams(temperature=0, max_tokens=1)
    prompts = random_prompts(4, [10, 10, 10, 10], seed=3)
    engine.add_request("relaxed", prompts[0], params, deadline=now + 100.0)
    engine.add_request("missed", prompts[1], params, deadline=now - 1.0)
    engine.add_request("urgent", prompts[2], params, deadline=now + 5.0)
    engine.add_request("none", prompts[3], params)
    order = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                order.append(out.request_id)
    # Feasible deadlines by slack, then the one already missed, then requests with no deadline.
    assert order == ["urgent", "relaxed", "missed", "none"]


def test_deadline_slack_counts_prefill_work(folder):
    llm = make_llm(folder, scheduling_policy="deadline", max_num_seqs=1)
    sched = llm.engine.scheduler
    sched.prefill_seconds_per_token = 0.01
    now = time.monotonic()
    params = SamplingParams(temperature=0, max_tokens=1)
    # Same deadline; the longer prompt needs more time, so it has less slack and goes first.
    llm.engine.add_request("short", random_prompts(1, [10])[0], params, deadline=now + 5.0)
    llm.engine.add_request("long", random_prompts(1, [300])[0], params, deadline=now + 5.0)
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["long"]


def test_ttft_slo_sets_default_deadline(folder):
    llm = make_llm(folder, scheduling_policy="deadline", ttft_slo=2.0)
    llm.engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=1))
    req = llm.engine.scheduler.waiting[0]
    assert req.deadline == pytest.approx(req.arrival_time + 2.0)
    assert req.status is RequestStatus.WAITING


def test_token_budget_defaults_to_the_device_and_can_be_set(folder):
    # On CPU a step of 512 prompt tokens keeps the gap between a running request's tokens short.
    engine = make_llm(folder, num_kv_blocks=64).engine
    assert engine.scheduler.max_num_batched_tokens == 512
    engine.add_request("long", random_prompts(1, [700], seed=3)[0], SamplingParams(temperature=0, max_tokens=1))
    engine.step()
    assert engine.scheduler.running[0].num_computed_tokens == 512  # the first chunk, not the whole prompt
    assert make_llm(folder, num_kv_blocks=64, max_num_batched_tokens=100).engine.scheduler.max_num_batched_tokens == 100
