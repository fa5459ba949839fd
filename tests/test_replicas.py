"""Replicas on Ray behind one LLM: every router policy gives the outputs of one engine, KV pools end
free, prefix affinity keeps prefixes where they were cached, and every socket is on loopback."""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from llmserve.cluster.router import LeastLoad, PowerOfTwo, PrefixAffinity, ReplicaLoad, RoundRobin
from llmserve.errors import InvalidRequestError
from llmserve.privacy.routing import RoutingFeatures
from llmserve.sampling_params import SamplingParams
from server_fixtures import free_port
from tiny_models import llama_config, make_llm, make_model_folder, random_prompts, run_to_idle


def feats(*hashes: bytes) -> RoutingFeatures:
    return RoutingFeatures(16 * len(hashes), 8, 1, hashes)


def test_routers():
    loads = [ReplicaLoad(1, 2), ReplicaLoad(0, 1), ReplicaLoad(3, 3)]
    rr = RoundRobin()
    assert [rr.choose(feats(), loads) for _ in range(4)] == [0, 1, 2, 0]
    assert LeastLoad().choose(feats(), loads) == 1
    p2 = PowerOfTwo(seed=1)
    picks = [p2.choose(feats(), loads) for _ in range(50)]
    assert 2 not in picks or picks.count(2) < 10  # the busiest wins only against itself... never
    aff = PrefixAffinity(imbalance=4)
    even = [ReplicaLoad(0, 2), ReplicaLoad(0, 1)]
    first = aff.choose(feats(b"a", b"b"), even)
    assert first == 1  # nothing remembered: least load
    assert aff.choose(feats(b"a", b"b", b"c"), [ReplicaLoad(0, 1), ReplicaLoad(0, 3)]) == 1  # its prefix is there
    assert aff.choose(feats(b"x"), [ReplicaLoad(0, 1), ReplicaLoad(0, 3)]) == 0  # no prefix anywhere
    assert aff.choose(feats(b"a", b"b"), [ReplicaLoad(0, 0), ReplicaLoad(0, 9)]) == 0  # imbalance wins


def step_growing_streams(engine, seen: dict[str, list[int]]) -> None:
    """One step; each request's tokens so far go into `seen`, which they must extend: a stream only
    grows, no token repeated or changed (across failovers and migrations too)."""
    for out in engine.step():
        before = seen.get(out.request_id, [])
        assert out.outputs[0].token_ids[:len(before)] == before
        seen[out.request_id] = list(out.outputs[0].token_ids)


@pytest.fixture(scope="module")
def ray_session():
    from llmserve.cluster.local_ray import start_ray

    session = start_ray(num_cpus=2)
    yield session
    session.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("replica-llama")
    make_model_folder(path, llama_config())
    return path


def test_a_replica_emptied_between_steps_reports_no_wait_on_the_front_end(folder):
    """The actor's body, in-process: once its last request leaves between steps (handed off as a
    prefill replica's are, or aborted), its next step counts no wait on the front end; while a
    request stays, it does."""
    from llmserve.cluster.replicas import EngineReplica
    from llmserve.config import EngineConfig

    config = EngineConfig(model=str(folder), device="cpu", dtype="float32", num_kv_blocks=64, block_size=16)
    replica = EngineReplica({f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompt = random_prompts(1, [20], seed=2)[0]
    for take_out in ("export", "abort"):
        replica.add_request("a", prompt, params, None, 0, None, None, None)
        first = replica.step()
        assert first.waited is None and first.shape is not None and first.cpu_s > 0
        assert replica.step().waited is not None  # it had work left after the first step
        # As the front end does: no step of this replica until it is given a request again.
        replica.export_request("a") if take_out == "export" else replica.abort_request(["a"])
        replica.add_request("b", prompt, params, None, 0, None, None, None)
        assert replica.step().waited is None, take_out
        replica.abort_request(["b"])
        replica.step()


@pytest.mark.parametrize("router", ["round_robin", "least_load", "power_of_two", "prefix_affinity"])
def test_two_replicas_give_one_engines_outputs(ray_session, folder, router):
    prompts = random_prompts(6, [5, 40, 17, 33, 1, 24], seed=4)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in make_llm(folder).generate(prompts, params, use_tqdm=False)]
    llm = make_llm(folder, replicas=2, router=router)
    llm.engine.step_log = []
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert got == want
        assert llm.engine.kv_all_free()
        assert not llm.engine.has_unfinished_requests()
        # Every replica step's shape reached the front end: all prompt tokens computed once (no
        # shared prefixes here), one decode per later token, each step with its whole time.
        log = llm.engine.step_log
        assert sum(p for _, p, *_ in log) == sum(map(len, prompts))
        assert sum(d for _, _, d, _, _ in log) == len(prompts) * (params.max_tokens - 1)
        assert {i for i, *_ in log} == {0, 1} and all(s > 0 for *_, s in log)
    finally:
        llm.shutdown()


def test_prefix_affinity_keeps_prefixes_where_they_are(ray_session, folder):
    systems = random_prompts(4, [48] * 4, seed=9)  # four 3-block system prompts
    prompts = [systems[i % 4] + tail for i, tail in enumerate(random_prompts(24, [5] * 24, seed=10))]
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)

    def hit_rate(llm, engine_stats) -> float:
        for i in range(0, len(prompts), 4):  # arrivals in waves, so earlier prefixes are cached
            llm.generate(prompts[i:i + 4], params, use_tqdm=False)
        queries, hits = engine_stats()
        return hits / queries

    single = make_llm(folder)
    one = hit_rate(single, lambda: (single.engine.kv.prefix_queries, single.engine.kv.prefix_hits))
    llm = make_llm(folder, replicas=2, router="prefix_affinity")
    try:
        two = hit_rate(llm, llm.engine.prefix_stats)
    finally:
        llm.shutdown()
    assert two >= 0.9 * one


def _non_loopback_listeners(pids: set[int]) -> list[str]:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids and not line.split()[3].startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")):
            found.append(line)
    return found


def _family(root: int) -> set[int]:
    """root and every process below it."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        pid, ppid = map(int, line.split())
        children.setdefault(ppid, []).append(pid)
    family, todo = set(), [root]
    while todo:
        pid = todo.pop()
        family.add(pid)
        todo.extend(children.get(pid, []))
    return family


def test_ray_listens_on_loopback_only(ray_session):
    out = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
    ours = [line for line in out.splitlines()
            if any(name in line for name in ("raylet", "gcs_server", "ray::", "plasma"))]
    assert ours
    assert _non_loopback_listeners(_family(os.getpid())) == []


def test_a_server_with_replicas_listens_on_loopback_only(tmp_path):
    """`llmserve serve --replicas 2` in its own process (Ray imported before it is started there):
    every socket of it and of every process it started is on 127.0.0.1."""
    import httpx

    make_model_folder(tmp_path, llama_config())
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llmserve.cli", "serve", str(tmp_path), "--port", str(port),
                             "--replicas", "2", "--num-kv-blocks", "64"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "LLMSERVE_NUM_THREADS": "2"},
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, "the server exited"
            time.sleep(0.5)
        family = _family(proc.pid)
        assert len(family) > 3  # Ray's processes and the replicas are there to check
        assert _non_loopback_listeners(family) == []
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def test_server_with_two_replicas_streams(ray_session):
    import httpx

    from server_fixtures import start_server, tiny_model_path

    server = start_server(tiny_model_path(), replicas=2, router="least_load", num_kv_blocks=64)
    try:
        body = {"model": "tiny", "prompt": "Hello there", "max_tokens": 5, "temperature": 0}
        whole = [httpx.post(server.base_url + "/v1/completions", json=body, timeout=60).json() for _ in range(3)]
        texts = {w["choices"][0]["text"] for w in whole}
        assert len(texts) == 1  # greedy, whichever replica answered
        with httpx.stream("POST", server.base_url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            pieces = [line for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
        import json
        assert "".join(json.loads(p[6:])["choices"][0]["text"] for p in pieces) == texts.pop()
        assert httpx.get(server.base_url + "/health").status_code == 200
        metrics = httpx.get(server.base_url + "/metrics").text
        assert 'llmserve:replicas_serving{model_name="tiny"} 2.0' in metrics
        assert 'llmserve:replica_num_requests_running{model_name="tiny",replica="1"}' in metrics
        assert 'llmserve:kv_transfers_total{model_name="tiny"} 0.0' in metrics
        counters = {name: float(v) for name, v in re.findall(r'^llmserve:(replica_\w+)_total\{[^}]*\} (\S+)', metrics, re.M)}
        assert counters["replica_steps"] >= 5  # 4 requests of 5 tokens: at least a step a token
        assert counters["replica_step_seconds"] > 0 and counters["replica_step_cpu_seconds"] > 0
        assert "replica_front_wait_seconds" in counters
    finally:
        server.stop()


def test_a_refused_request_is_the_replicas_typed_error(ray_session, folder):
    from llmserve.errors import LLMServeError

    llm = make_llm(folder, replicas=2, max_model_len=64)
    try:
        with pytest.raises(LLMServeError, match="context"):
            llm.generate([list(range(3, 100))], SamplingParams(max_tokens=4), use_tqdm=False)
        assert llm.engine.kv_all_free() and not llm.engine.has_unfinished_requests()
    finally:
        llm.shutdown()


def test_a_killed_replica_loses_no_request(ray_session, folder):
    import os
    import signal

    prompts = random_prompts(8, [5, 40, 17, 33, 1, 24, 9, 12], seed=6)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in make_llm(folder).generate(prompts, params, use_tqdm=False)]
    llm = make_llm(folder, replicas=2, router="round_robin")
    engine = llm.engine
    try:
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        seen: dict[str, list[int]] = {}
        killed = False
        while engine.has_unfinished_requests():
            step_growing_streams(engine, seen)
            if not killed and min(len(v) for v in seen.values() or [[]]) >= 5:
                os.kill(engine.replica_pids()[0], signal.SIGKILL)
                killed = True
        assert killed and engine.restarts == 1
        assert [seen[str(i)] for i in range(len(prompts))] == want
    finally:
        llm.shutdown()


def test_a_refusal_only_the_replica_finds_ends_that_request_alone(ray_session, folder):
    """The front end hands requests over without waiting; one the replica refuses after all (here:
    the front end's checks switched off, a prompt over the context) ends with an error output, and
    the requests beside it finish as one engine finishes them."""
    from llmserve.engine.admission import Admitted

    prompts = random_prompts(3, [5, 12, 9], seed=7)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in make_llm(folder, max_model_len=64).generate(prompts, params,
                                                                                         use_tqdm=False)]
    llm = make_llm(folder, replicas=2, router="round_robin", max_model_len=64)
    engine = llm.engine
    try:
        engine.admission.check = lambda ids, p: Admitted(list(ids), 1, None, None)
        engine.add_request("a", prompts[0], params)
        engine.add_request("too-long", list(range(3, 100)), params)
        engine.add_request("b", prompts[1], params)
        engine.add_request("c", prompts[2], params)
        done = {rid: o for rid, o in run_to_idle(engine).items() if o.finished}
        assert done["too-long"].outputs[0].finish_reason == "error" and not done["too-long"].outputs[0].token_ids
        assert [done[r].outputs[0].token_ids for r in "abc"] == want
        assert engine.kv_all_free()
    finally:
        llm.shutdown()


def _until_restarted(engine, replica: int, old_pid: int) -> None:
    import ray

    for _ in range(600):
        try:
            if ray.get(engine.replicas[replica].pid.remote(), timeout=1) != old_pid:
                return
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        time.sleep(0.05)
    raise AssertionError("the replica was not restarted")


def test_a_replica_restarted_between_steps_loses_no_request(ray_session, folder):
    """Killed while it has no step in flight and restarted by Ray before the next: no call fails, but
    the new instance holds none of its requests; they continue from what was streamed. Requests
    added after the restart reached the new instance: they are aborted there and start again, and
    that abort does not end the copy that starts again."""
    import ray

    prompts = random_prompts(7, [5, 21, 9, 14, 11, 7, 6], seed=8)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in make_llm(folder).generate(prompts, params, use_tqdm=False)]
    llm = make_llm(folder, replicas=2, router="round_robin")
    engine = llm.engine
    try:
        for i, p in enumerate(prompts[:4]):
            engine.add_request(str(i), p, params)
        seen: dict[str, list[int]] = {}
        killed = False
        for _ in range(500):
            if not engine.has_unfinished_requests():
                break
            step_growing_streams(engine, seen)
            if not killed and min(len(v) for v in seen.values() or [[]]) >= 4:
                ray.wait(list(engine._inflight.values()), num_returns=len(engine._inflight))  # steps done
                pid = engine.replica_pids()[1]
                os.kill(pid, signal.SIGKILL)
                _until_restarted(engine, 1, pid)
                for i in (4, 5, 6):  # "5" to the restarted replica, and (in turn) back to it after
                    engine.add_request(str(i), prompts[i], params)
                killed = True
        assert killed and engine.restarts == 1 and not engine.has_unfinished_requests()
        assert [seen[str(i)] for i in range(len(prompts))] == want
    finally:
        llm.shutdown()


def test_a_request_migrated_into_a_dying_replica_is_not_lost(ray_session, folder):
    prompts = random_prompts(3, [20, 9, 30], seed=13)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in make_llm(folder).generate(prompts, params, use_tqdm=False)]
    llm = make_llm(folder, replicas=2, router="round_robin")
    engine = llm.engine
    try:
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        seen, moved = {}, False
        for _ in range(500):
            if not engine.has_unfinished_requests():
                break
            step_growing_streams(engine, seen)
            if not moved and len(seen.get("0", [])) >= 4:
                assert engine._live["0"].replica == 0
                os.kill(engine.replica_pids()[1], signal.SIGKILL)
                engine.migrate("0", 1)
                moved = True
        assert moved and engine.restarts >= 1 and not engine.has_unfinished_requests()
        assert [seen[str(i)] for i in range(3)] == want
    finally:
        llm.shutdown()


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_disaggregated_prefill_and_decode_give_colocated_outputs(ray_session, folder, seeded):
    prompts = random_prompts(6, [5, 40, 17, 33, 1, 24], seed=12)
    prompts.append(prompts[1] + [7, 8])  # a prefix hit on the prefill replica
    params = (SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=10, ignore_eos=True) if seeded
              else SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    want = [o.outputs[0].token_ids for o in make_llm(folder).generate(prompts, params, use_tqdm=False)]
    llm = make_llm(folder, prefill_replicas=1, decode_replicas=1)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert got == want
        engine = llm.engine
        assert engine.transfers == len(prompts) and engine.transfer_bytes > 0
        assert engine.kv_all_free()
    finally:
        llm.shutdown()


def test_live_migration_mid_decode_keeps_the_completion(ray_session, folder):
    prompts = random_prompts(3, [20, 9, 30], seed=13)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in make_llm(folder).generate(prompts, params, use_tqdm=False)]
    llm = make_llm(folder, replicas=2, router="round_robin")
    engine = llm.engine
    try:
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        seen, moved = {}, False
        while engine.has_unfinished_requests():
            step_growing_streams(engine, seen)
            if not moved and len(seen.get("0", [])) >= 4:
                engine.migrate("0", 1 - engine._live["0"].replica)
                moved = True
        assert moved and [seen[str(i)] for i in range(3)] == want
        assert engine.kv_all_free()
    finally:
        llm.shutdown()


def test_migration_evens_out_a_skewed_load_and_drains(ray_session, folder):
    llm = make_llm(folder, replicas=2, router="round_robin", num_kv_blocks=256)
    engine = llm.engine
    engine.imbalance = 2
    try:
        long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        short = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        for i, p in enumerate(random_prompts(12, [6] * 12, seed=30)):
            engine.add_request(str(i), p, long if i % 2 == 0 else short)  # replica 0 gets the long ones
        worst = 0
        for _ in range(8):
            engine.step()
            counts = [sum(t.replica == r for t in engine._live.values()) for r in (0, 1)]
            worst = max(worst, abs(counts[0] - counts[1]))
        assert engine.transfers > 0 and abs(counts[0] - counts[1]) <= engine.imbalance + 1
        engine.drain(1)
        assert all(t.replica == 0 for t in engine._live.values())
        with pytest.raises(InvalidRequestError, match="last one serving"):
            engine.drain(0)  # its requests would have nowhere to go: refused, and it keeps serving
        assert engine.serving == [0]
        while engine.has_unfinished_requests():
            engine.step()
        assert engine.kv_all_free()
    finally:
        llm.shutdown()


def test_server_streams_survive_a_killed_replica(ray_session):
    import json
    import os
    import signal
    import threading

    import httpx

    from server_fixtures import start_server, tiny_model_path

    server = start_server(tiny_model_path(), replicas=2, router="round_robin", num_kv_blocks=64)
    prompts = [f"Story number {i}:" for i in range(8)]
    body = {"model": "tiny", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    try:
        want = [httpx.post(server.base_url + "/v1/completions", json={**body, "prompt": p}, timeout=120)
                .json()["choices"][0]["text"] for p in prompts]
        streamed: dict[int, list[str]] = {i: [] for i in range(len(prompts))}
        started = threading.Event()

        def stream(i: int) -> None:
            with httpx.stream("POST", server.base_url + "/v1/completions", timeout=120,
                              json={**body, "prompt": prompts[i], "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        streamed[i].append(json.loads(line[6:])["choices"][0]["text"])
                        if sum(len(v) for v in streamed.values()) > 16:
                            started.set()
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        assert started.wait(120)
        os.kill(server.engine.engine.replica_pids()[0], signal.SIGKILL)
        for t in threads:
            t.join(180)
        assert ["".join(streamed[i]) for i in range(len(prompts))] == want  # no token repeated or lost
        assert server.engine.engine.restarts == 1
    finally:
        server.stop()


def test_replicas_on_a_host_share_one_copy_of_the_weights(ray_session):
    from llmserve import LLM

    private = {}
    for share in (False, True):
        llm = LLM(replicas=2, share_weights=share, num_kv_blocks=64)
        try:
            out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
            private[share] = (sum(m["private"] for m in llm.engine.replica_memory()), out[0].outputs[0].token_ids)
        finally:
            llm.shutdown()
    assert private[True][1] == private[False][1]
    # The embedded model's blocks (~100 MB) and tables are held once in shared memory, not per replica.
    assert private[False][0] - private[True][0] > 2 * 100_000  # kB


def test_scale_out_and_in_lose_no_request(ray_session, folder):
    prompts = random_prompts(6, [8, 30, 12, 5, 20, 16], seed=40)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in make_llm(folder).generate(prompts, params, use_tqdm=False)]
    llm = make_llm(folder, replicas=2, router="least_load")
    engine = llm.engine
    try:
        for i, p in enumerate(prompts[:3]):
            engine.add_request(str(i), p, params)
        engine.step()
        assert engine.add_replica() == 2 and engine.serving == [0, 1, 2]
        for i, p in enumerate(prompts[3:], start=3):
            engine.add_request(str(i), p, params)  # least load: the new replica takes some
        assert any(t.replica == 2 for t in engine._live.values())
        seen = {}
        for _ in range(4):
            for out in engine.step():
                seen[out.request_id] = out.outputs[0].token_ids
        engine.remove_replica(0)  # scale in mid-stream: its requests move on
        assert engine.serving == [1, 2] and all(t.replica != 0 for t in engine._live.values())
        while engine.has_unfinished_requests():
            for out in engine.step():
                seen[out.request_id] = out.outputs[0].token_ids
        assert [seen[str(i)] for i in range(len(prompts))] == want
        assert engine.kv_all_free()
    finally:
        llm.shutdown()


def test_a_new_replica_maps_the_weights_without_reading_the_weights_file(ray_session, tmp_path):
    make_model_folder(tmp_path, llama_config())
    prompt = random_prompts(1, [20], seed=41)[0]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = make_llm(tmp_path).generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    llm = make_llm(tmp_path, replicas=1, autoscale="1:2", ttft_slo=1e6, tpot_slo=1e6)  # a replicated engine of one
    try:
        (tmp_path / "model.safetensors").rename(tmp_path / "moved-away")  # nothing left to load from
        engine = llm.engine
        new = engine.add_replica()
        engine.remove_replica(0)
        assert engine.serving == [new]
        assert llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids == want
    finally:
        llm.shutdown()
