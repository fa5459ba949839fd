"""The goodput planner (cluster/planner.py): its simulator against cases worked out by hand, the
step-time fit, the goodput search and the placements it considers."""
from __future__ import annotations

import numpy as np
import pytest

from llmserve.cluster.planner import (Placement, SimRequest, StepTimeModel, candidate_placements, goodput,
                                      poisson_requests, simulate)

# 0.1 s a step, 10 ms a prompt token, 20 ms a decoding sequence, context free.
MODEL = StepTimeModel(0.1, 0.01, 0.02, 0.0)
A, B = SimRequest(0.0, 10, 3), SimRequest(0.05, 20, 2)


def test_colocated_case_by_hand():
    """Budget 16. Step 1 (t 0 -> 0.2): A's 10 prompt tokens; A's first token. Step 2 (-> 0.47): A
    decodes, B's first 15 prompt tokens. Step 3 (-> 0.64): A decodes (done), B's last 5; B's first
    token. Step 4 (-> 0.76): B decodes (done)."""
    res = simulate(Placement(1, 1, token_budget=16), MODEL, [A, B])
    assert res.ttft == pytest.approx([0.2, 0.59], abs=1e-12)
    assert res.tpot == pytest.approx([(0.64 - 0.2) / 2, 0.76 - 0.64], abs=1e-12)


def test_disaggregated_case_by_hand():
    """Prefill replica: A (-> 0.2), B in chunks of 16 (-> 0.46) and 4 (-> 0.60). Decode replica,
    1 ms a prompt token to move: A from 0.21, two steps of 0.12 (-> 0.45); B from 0.62 (-> 0.74)."""
    res = simulate(Placement(2, 1, token_budget=16, prefill_replicas=1), MODEL, [A, B], transfer_s_per_token=0.001)
    assert res.ttft == pytest.approx([0.2, 0.55], abs=1e-12)
    assert res.tpot == pytest.approx([(0.45 - 0.2) / 2, 0.74 - 0.60], abs=1e-12)


def test_round_robin_over_replicas_and_attainment():
    res = simulate(Placement(2, 1, token_budget=16), MODEL, [A, B])
    assert res.ttft == pytest.approx([0.2, 0.1 + 0.16 + 0.1 + 0.04], abs=1e-12)  # B alone on replica 1
    assert res.attainment(ttft_slo=0.3, tpot_slo=1.0) == 0.5
    assert res.attainment(ttft_slo=1.0, tpot_slo=1.0) == 1.0


def test_fit_recovers_a_model_from_its_steps():
    rng = np.random.default_rng(0)
    truth = StepTimeModel(0.004, 2e-5, 3e-4, 5e-8)
    samples = [(int(p), int(d), int(c), truth.step_s(p, d, c))
               for p, d, c in zip(rng.integers(0, 512, 40), rng.integers(0, 64, 40), rng.integers(0, 20000, 40))]
    fitted = StepTimeModel.fit(samples)
    for got, want in zip((fitted.fixed_s, fitted.per_prefill_token_s, fitted.per_decode_seq_s,
                          fitted.per_context_token_s), (truth.fixed_s, truth.per_prefill_token_s,
                                                        truth.per_decode_seq_s, truth.per_context_token_s)):
        assert got == pytest.approx(want, rel=1e-6)
    # a term the data says is negative (noise) is dropped, never negative
    noisy = [(p, d, c, max(s - 1e-9 * c, 0.0)) for p, d, c, s in samples if c == 0] + [(0, 1, 100, 0.0043)]
    assert min(vars(StepTimeModel.fit(noisy)).values()) >= 0.0


def test_goodput_is_the_highest_rate_meeting_the_slos():
    lengths = [(200, 50)] * 60
    one = Placement(1, 1)
    rate = goodput(one, MODEL, lengths, ttft_slo=5.0, tpot_slo=0.5)
    assert rate > 0
    attained = simulate(one, MODEL, poisson_requests(lengths, rate)).attainment(5.0, 0.5)
    failed = simulate(one, MODEL, poisson_requests(lengths, rate * 1.05)).attainment(5.0, 0.5)
    assert attained >= 0.9 > failed
    assert goodput(Placement(2, 1), MODEL, lengths, 5.0, 0.5) > rate  # twice the replicas, more goodput
    assert goodput(one, MODEL, lengths, ttft_slo=0.01, tpot_slo=0.5) == 0.0  # no rate makes a 10 ms TTFT


def test_candidates_for_two_cores():
    got = {str(p) for p in candidate_placements(2, budgets=(512,))}
    assert got == {"2 replicas x 1 thread, budget 512", "1 prefill + 1 decode x 1 thread, budget 512",
                   "1 replica x 2 threads, budget 512"}


def test_plan_command_profiles_and_ranks_every_placement(tmp_path, capsys):
    from llmserve.cli import main
    from tiny_models import llama_config, make_model_folder

    make_model_folder(tmp_path / "m", llama_config())
    out = tmp_path / "plan.json"
    main(["plan", "--model", str(tmp_path / "m"), "--device", "cpu", "--dtype", "float32", "--cores", "2",
          "--num-requests", "20", "--budgets", "64", "--max-input-len", "64", "--max-output-len", "16",
          "--output-json", str(out)])
    import json

    plan = json.loads(out.read_text())
    assert set(plan["models"]) == {"1", "2"}
    assert all(v >= 0 for m in plan["models"].values() for v in m.values())
    assert {r["placement"] for r in plan["ranked"]} == {str(p) for p in candidate_placements(2, budgets=(64,))}
    # One thread a replica: two replicas share the two cores, so two engines profile at once.
    assert "step model at 1 thread (2 at once)" in capsys.readouterr().out
    per_core = [r["per_core"] for r in plan["ranked"]]
    assert per_core == sorted(per_core, reverse=True) and plan["transfer_s_per_token"] > 0


class _RecordingModel:
    """A step-time model that records the step shapes the simulator asks it about (1 s a step)."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, int, int]] = []

    def step_s(self, prefill_tokens: int, decode_seqs: int, attended: int) -> float:
        self.shapes.append((prefill_tokens, decode_seqs, attended))
        return 1.0


def test_the_simulator_builds_the_steps_the_engine_runs(tmp_path):
    """Requests all there at the start: the simulator's steps (prompt tokens, decodes, positions
    attended) are the engine's own, step for step, chunks, decodes and budget alike."""
    from tiny_models import llama_config, make_llm, make_model_folder, random_prompts

    from llmserve.sampling_params import SamplingParams

    make_model_folder(tmp_path / "m", llama_config())
    engine = make_llm(tmp_path / "m", max_num_batched_tokens=16, max_num_seqs=8).engine
    lengths = [(10, 3), (20, 2), (5, 4), (33, 5)]
    for i, ((p, o), prompt) in enumerate(zip(lengths, random_prompts(4, [p for p, _ in lengths], seed=1))):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=o, ignore_eos=True))
    ran = []
    while engine.has_unfinished_requests():
        engine.step()
        ran.append(engine.last_step_shape[:3])
    recorder = _RecordingModel()
    simulate(Placement(1, 1, token_budget=16), recorder, [SimRequest(0.0, p, o) for p, o in lengths])
    assert recorder.shapes == ran
