"""The autoscaler's decisions on a scripted load with a fake clock: out within the window when a rate
step would miss the SLOs, in only after the hysteresis, never past the bounds. Then live, on Ray
replicas: a scale-out while requests run (none waits on the new replica's start) and a scale-in that
drains a replica by migration, outputs unchanged."""
from __future__ import annotations

import dataclasses
import time

import pytest

from llmserve.cluster.autoscaler import AutoscaleConfig, Autoscaler, LoadSample, StepModel, predict
from llmserve.errors import InvalidRequestError
from llmserve.sampling_params import SamplingParams
from tiny_models import llama_config, make_llm, make_model_folder, random_prompts

MODEL = StepModel(prefill_s_per_token=0.002, decode_step_s=0.02, decode_s_per_seq=0.004)
CONFIG = AutoscaleConfig(min_replicas=1, max_replicas=3, ttft_slo_s=2.0, tpot_slo_s=0.1, out_window_s=5, in_hold_s=30)


def test_prediction_matches_a_hand_computed_case():
    # 3000 queued prompt tokens over 2 replicas: 1500 x 2 ms = 3 s; 40 running over 2: 20 ms + 20 x 4 ms
    ttft, tpot = predict(MODEL, LoadSample(0, 2, 3000, 40), 2)
    assert ttft == pytest.approx(3.0) and tpot == pytest.approx(0.1)
    # 200 prompt tokens/s over 2 replicas at 2 ms a token: prompts take 20% of each replica's time,
    # so decodes stretch to 0.1 / 0.8.
    _, tpot = predict(MODEL, LoadSample(0, 2, 3000, 40, prompt_tokens_per_s=200), 2)
    assert tpot == pytest.approx(0.125)


def test_a_rate_step_up_then_down():
    scaler, replicas, decisions, peak = Autoscaler(CONFIG, MODEL), 1, [], 1
    load = [(t, 200, 10) for t in range(0, 20)]  # light: 0.4 s TTFT, 60 ms TPOT at one replica
    load += [(t, 1600, 30) for t in range(20, 60)]  # x4-ish: 3.2 s TTFT, 140 ms TPOT at one
    load += [(t, 100, 4) for t in range(60, 200)]  # back down
    for now, waiting, running in load:
        d = scaler.decide(LoadSample(float(now), replicas, waiting, running))
        if d.delta:
            decisions.append((now, d.delta))
            replicas += d.delta
            peak = max(peak, replicas)
        assert CONFIG.min_replicas <= replicas <= CONFIG.max_replicas
    outs = [t for t, d in decisions if d > 0]
    ins = [t for t, d in decisions if d < 0]
    assert outs and 20 < outs[0] <= 25  # the step at t=20 breaches: out once the 5 s mean misses the SLO
    assert peak >= 2  # 3200 tokens over 2 replicas: 1.6 s TTFT, 80 ms TPOT: within the SLOs
    assert ins and ins[0] >= 60 + 30  # calm from t=60, in only after the 30 s hold
    assert replicas == 1  # and back to the minimum


def test_ticks_off_the_whole_second_still_scale_out():
    # A real clock never lands on exact multiples of the window: a sustained breach must still count.
    scaler = Autoscaler(CONFIG, MODEL)
    deltas = [scaler.decide(LoadSample(0.37 + 1.013 * k, 1, 1600, 30)).delta for k in range(10)]
    assert 1 in deltas and deltas.index(1) in (5, 6)


def test_a_burst_alone_does_not_scale_out():
    scaler = Autoscaler(CONFIG, MODEL)
    # Every 4th second a burst (3.2 s predicted TTFT), light between: the 5 s mean stays under 2 s.
    for now in range(60):
        waiting = 1600 if now % 4 == 0 else 200
        assert scaler.decide(LoadSample(float(now), 1, waiting, 10)).delta == 0
    # Bursts two seconds in three: the mean misses the SLO, and it scales out.
    deltas = [scaler.decide(LoadSample(float(now), 1, 1600 if now % 3 else 200, 10)).delta for now in range(60, 80)]
    assert 1 in deltas


def test_bounds_are_kept_and_bad_configs_refused():
    scaler = Autoscaler(AutoscaleConfig(1, 1, 1.0, 0.05), MODEL)
    assert scaler.decide(LoadSample(100.0, 1, 10**6, 500)).delta == 0  # already at the maximum
    with pytest.raises(ValueError):
        AutoscaleConfig(3, 2, 1.0, 0.1)


def test_autoscale_settings_are_checked(tmp_path):
    from llmserve.config import EngineConfig

    assert EngineConfig(autoscale="2:4", ttft_slo=1.0, tpot_slo=0.1).replicas == 2
    for bad in ("4:2", "0:2", "two", "1:2:3"):
        with pytest.raises(InvalidRequestError, match="MIN"):
            EngineConfig(autoscale=bad, ttft_slo=1.0, tpot_slo=0.1)
    with pytest.raises(InvalidRequestError, match="tpot_slo"):
        EngineConfig(autoscale="1:2", ttft_slo=1.0)
    with pytest.raises(InvalidRequestError, match="delays"):
        EngineConfig(autoscale="1:2", ttft_slo=1.0, tpot_slo=0.1, upscale_delay_s=-1)
    with pytest.raises(InvalidRequestError, match="colocated"):
        EngineConfig(autoscale="1:2", ttft_slo=1.0, tpot_slo=0.1, prefill_replicas=1, decode_replicas=1)


def test_live_scale_out_then_in_loses_nothing(tmp_path):
    make_model_folder(tmp_path, llama_config())
    prompts = random_prompts(6, [12, 30, 5, 21, 17, 9], seed=5)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in make_llm(tmp_path).generate(prompts, params, use_tqdm=False)]
    # SLOs no step can meet: the first decision with a fitted step-time model is to scale out.
    llm = make_llm(tmp_path, autoscale="1:2", ttft_slo=1e-6, tpot_slo=1e-6)
    engine = llm.engine
    try:
        engine.tick_s, engine.refit_every = 0.0, 4
        scaler = engine.autoscaler
        scaler.config = dataclasses.replace(scaler.config, out_window_s=0.0, in_hold_s=0.0)
        assert engine.serving == [0] and scaler.model is None
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert got == want  # served while the new replica started
        assert engine.scale_outs == 1 and scaler.model is not None
        assert scaler.model.prefill_s_per_token >= 0 and scaler.model.decode_step_s >= 0
        deadline = time.monotonic() + 120
        while engine.serving != [0, 1] and time.monotonic() < deadline:
            engine.tick()
            time.sleep(0.05)
        assert engine.serving == [0, 1]
        # SLOs any step meets: one replica fewer holds them, so scale in, draining one mid-request.
        scaler.config = dataclasses.replace(scaler.config, ttft_slo_s=1e6, tpot_slo_s=1e6)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert got == want
        assert engine.scale_ins == 1 and len(engine.serving) == 1 and engine.scale_outs == 1
        assert engine.kv_all_free()
    finally:
        llm.shutdown()
