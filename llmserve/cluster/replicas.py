"""Engine replicas as Ray actors, each an LLMEngine in its own process with its share of the
threads, behind the engine's own interface (add_request, abort_request, step,
has_unfinished_requests), so LLM(..., replicas=N) runs unchanged on top of them.

Each replica with work has one step in flight at a time; a step of the front end returns the
outputs of whichever replicas finished one and starts their next, so replicas compute in parallel
and none waits for another's step (a decode replica's tokens do not wait on a long prompt chunk
elsewhere). Each step returns its outputs and its load, which the router reads.

Nothing the front end sends a replica (a request, an abort, a migrated request) waits for the
replica's step in flight: a request is checked here (engine/admission.py, as the engine checks it)
and handed over, and Ray runs it on the replica before that replica's next step. What the call
returned is read once the step behind it is collected; a refusal the front end could not foresee
ends that request with an error, and a replica that died takes its requests to another (failover).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from collections import deque
from dataclasses import dataclass

from llmserve.cluster.autoscaler import AutoscaleConfig, Autoscaler, LoadSample, step_model
from llmserve.cluster.router import ReplicaLoad, make_router
from llmserve.config import EngineConfig
from llmserve.engine.admission import Admission
from llmserve.engine.detokenizer import IncrementalDetokenizer
from llmserve.engine.engine import PROMPT_TAIL
from llmserve.engine.kv_cache import block_hash
from llmserve.errors import EngineDeadError, InvalidRequestError
from llmserve.outputs import CompletionOutput, RequestOutput
from llmserve.privacy.routing import RoutingFeatures
from llmserve.sampling_params import SamplingParams

logger = logging.getLogger("llmserve.cluster")
AUTOSCALE_TICK_S = 1.0
STEP_SAMPLES = 512  # the replicas' latest steps, to which the autoscaler's step-time model is fitted
REFIT_EVERY = 32  # new steps between fits
ARRIVAL_WINDOW_S = 30.0  # the prompt-token arrival rate is measured over this long
POLL_S = 0.005  # the longest a front-end step waits for a replica's step before returning (maybe empty)


@dataclass
class ReplicaStep:
    """What a replica's step returns to the front end."""
    incarnation: str  # which instance of the actor ran it (a restarted one holds none of its requests)
    outputs: list[RequestOutput]
    load: ReplicaLoad  # after the step, for the router
    stats: dict[str, float]
    error: str | None  # the type of the step's failure, if its forward failed
    # (prompt tokens, decodes, context tokens, whole-step seconds: scheduling and update too, as the
    # planner profiles steps); None if the step ran no request.
    shape: tuple[int, int, int, float] | None
    cpu_s: float  # CPU seconds of the replica's process in the step: below threads x seconds if it was starved
    waited: float | None  # how long the replica sat with work waiting for this call (None: it had none)


class EngineReplica:
    """One engine (the Ray actor's body)."""

    def __init__(self, config: dict, skeleton: bytes | None = None, chunks: list | None = None) -> None:
        from llmserve.engine import setup
        from llmserve.engine.engine import LLMEngine

        if skeleton is not None:  # the host's one copy of the weights, mapped from the object store
            import ray

            from llmserve.cluster.shared_weights import unpack
            from llmserve.cluster.weight_chain import joined

            # The chunks' references (not resolved by Ray as arguments): this host's copies, zero-copy.
            arrays = joined(ray.get(list(chunks)))
            setup.MODEL_SOURCE = lambda: unpack(skeleton, arrays)
        self.engine = LLMEngine(EngineConfig(**config))
        # Which instance of the actor this is: Ray restarts a dead replica under the same handle, and a
        # call sent after the death runs on the new, empty instance.
        self.incarnation = uuid.uuid4().hex
        self._work_left_at: float | None = None  # when the last step ended with work left (None: idle)

    def hello(self) -> str:
        """Answers once the engine is built: this instance's incarnation."""
        return self.incarnation

    def memory(self) -> dict[str, int]:
        """This process's resident memory in kB: all of it, its proportional share of shared pages,
        and what is its own alone (smaps_rollup)."""
        with open("/proc/self/smaps_rollup") as f:
            fields = dict(line.split(":", 1) for line in f.read().splitlines()[1:])
        kb = {k: int(v.split()[0]) for k, v in fields.items()}
        return {"rss": kb["Rss"], "pss": kb["Pss"], "private": kb["Private_Clean"] + kb["Private_Dirty"]}

    def add_request(self, request_id: str, token_ids: list[int], params: SamplingParams, prompt: str | None,
                    priority: int, cache_salt: str | None, deadline: float | None,
                    arrival_time: float | None) -> None:
        self.engine.add_request(request_id, token_ids, params, prompt=prompt, priority=priority, cache_salt=cache_salt,
                                deadline=deadline, arrival_time=arrival_time)

    def abort_request(self, ids: list[str]) -> None:
        self.engine.abort_request(ids)
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        """A request taken out between steps may leave the engine without work: the time until its
        next step is then no wait on the front end (a prefill replica after its last hand-off)."""
        if not self.engine.has_unfinished_requests():
            self._work_left_at = None

    def step(self) -> ReplicaStep:
        """One engine step (none if the engine holds no request) and what the front end reads with it."""
        start, cpu_start = time.monotonic(), time.process_time()
        waited = start - self._work_left_at if self._work_left_at is not None else None
        self.engine.last_step_shape = self.engine.last_step_error = None  # this step's, not an earlier one's
        outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
        end = time.monotonic()
        shape = self.engine.last_step_shape
        if shape is not None:
            shape = (*shape[:3], end - start)
        self._work_left_at = end if self.engine.has_unfinished_requests() else None
        return ReplicaStep(self.incarnation, outputs, self.load(), self.engine.stats(), self.engine.last_step_error,
                           shape, time.process_time() - cpu_start, waited)

    def stats(self) -> dict[str, float]:
        return self.engine.stats()

    def shutdown_engine(self) -> None:
        """Before the actor is killed: what the engine keeps outside its memory (the disk tier) goes."""
        self.engine.shutdown()

    def export_request(self, request_id: str) -> tuple[dict, int]:
        """The request with its KV, taken out of this engine; and the KV's size in bytes (called
        with num_returns=2, so the state can go to another replica without passing through here)."""
        state = self.engine.export_request(request_id, with_kv=True)
        self._maybe_idle()
        return state, sum(kv.nbytes() for kv in state["kv"] if kv is not None)

    def import_request(self, state: dict) -> None:
        self.engine.import_request(state)

    def facts(self) -> dict:
        """What the front end needs to know of the model (the same on every replica)."""
        e = self.engine
        return {"max_model_len": e.max_model_len, "model_config": e.model_config, "model_name": e.model_name,
                "eos_token_ids": e.eos_token_ids}

    def load(self) -> ReplicaLoad:
        s = self.engine.scheduler
        return ReplicaLoad(len(s.waiting), len(s.running), self.engine.kv.usage)

    def kv_free(self) -> bool:
        return self.engine.kv.usage == 0.0

    def prefix_stats(self) -> tuple[int, int]:
        """(prompt tokens looked up in the prefix cache, tokens found there)."""
        return self.engine.kv.prefix_queries, self.engine.kv.prefix_hits

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


@dataclass
class _Tracked:
    """What the front keeps of a request, so it can continue elsewhere if its replica dies."""
    token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    priority: int
    cache_salt: str | None
    replica: int
    last: RequestOutput | None = None  # as last streamed (cumulative)
    before: CompletionOutput | None = None  # what earlier replicas produced, when it was moved
    # After a failover the front detokenizes: the new replica's text starts after the tokens it was
    # given, so text the dead one held back (an incomplete character, a possible stop string) would
    # otherwise be lost. `fed`: how many of the new replica's tokens it has seen.
    detok: IncrementalDetokenizer | None = None
    fed: int = 0


class ReplicatedEngine:
    """N EngineReplica actors and a router, with the engine interface LLM and the async engine use.

    A replica that dies (its process killed) loses no request: each of its requests is re-added on
    a live replica as its prompt plus the tokens already streamed, with the budget that is left,
    and its later outputs are stitched onto what was streamed, so a stream neither repeats nor
    skips a token (greedy continues exactly; a sampled request continues with fresh draws). Ray
    restarts the replica (max_restarts), and it takes requests again once it answers.
    """

    def __init__(self, config: EngineConfig, threads: int | None = None) -> None:
        import ray

        from llmserve.cluster.local_ray import start_ray
        from llmserve.model.resolve import resolve_model_folder
        from llmserve.structured.compiler import GrammarCompiler
        from llmserve.tokenizer import load_tokenizer

        n = config.replicas
        total = threads or int(os.environ.get("LLMSERVE_NUM_THREADS", 0)) or os.cpu_count() or 1
        # Autoscaled: every replica gets its share of the cores at the maximum count, from the start.
        per = max(1, total // (config.autoscale[1] if config.autoscale else n))
        self.session = start_ray(num_cpus=max(total, n), address=config.ray_address) if not ray.is_initialized() else None
        folder = resolve_model_folder(config.model)  # converted here once, not by each replica at the same time
        self.tokenizer = load_tokenizer(config.tokenizer or folder)
        inner = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        inner.update(replicas=1, ray_address=None)
        # No logical CPUs reserved: each replica's thread count (LLMSERVE_NUM_THREADS) is what it
        # uses, and a scale-out must not wait for Ray's CPU accounting. Without a resource to
        # balance, Ray's SPREAD may stack replicas on one node: they go round the nodes instead.
        actor = ray.remote(num_cpus=0, max_restarts=-1,
                           runtime_env={"env_vars": {"LLMSERVE_NUM_THREADS": str(per)}})(EngineReplica)
        # Kept referenced for as long as the replicas live: Ray restarts a dead one with these arguments.
        self.skeleton, self.weights = self._share_weights(inner) if config.share_weights else (None, None)
        self._actor, self._inner = actor, inner
        if self.weights is not None:  # every host that gets a replica gets the weights first, in one chain
            self.weights.distribute([self._node_for(i) for i in range(n)])
        self.placed: list[str] = []  # each replica's node, as placed
        self.replicas = [self._start_replica(i) for i in range(n)]
        self.loads = [ReplicaLoad() for _ in range(n)]
        self.router = make_router(config.router, seed=config.seed or 0)
        # Disaggregated: prompts go to the first prefill_replicas, requests then move to the rest.
        self.prefill = list(range(config.prefill_replicas))
        self.decode = list(range(config.prefill_replicas, n)) if config.prefill_replicas else []
        self.transfers, self.transfer_s, self.transfer_bytes = 0, 0.0, 0
        self.imbalance = 8  # requests: beyond this difference between replicas, migrate to even out
        self._draining: set[int] = set()
        self._retired: set[int] = set()  # scaled in: stopped for good
        self.block_size = config.block_size
        self._live: dict[str, _Tracked] = {}
        self._down: dict[int, object] = {}  # replica -> its pending liveness probe while Ray restarts it
        self._inflight: dict[int, object] = {}  # replica -> its step in flight
        # replica -> calls sent without waiting: (kind, request id, reference), read after its next step.
        self._pending: dict[int, list[tuple[str, str, object]]] = {}
        # Outputs of a replica's step collected out of turn (before a request leaves it), for the next step().
        self._early: list[RequestOutput] = []
        self.restarts = 0
        self.steps_waited, self.waited_s = 0, 0.0  # replicas' steps that waited on the front end, and how long
        # The whole-step seconds of every replica step that ran requests (steps_run of them), and the CPU
        # seconds the replicas had in them (below threads x step_s when other processes take their cores).
        self.step_s, self.step_cpu_s = 0.0, 0.0
        self.step_log: list[tuple] | None = None  # set to a list to keep every step's (replica, *shape)
        self._incarnations = ray.get([r.hello.remote() for r in self.replicas])  # every replica's engine is built
        facts = ray.get(self.replicas[0].facts.remote())
        self.max_model_len, self.model_config = facts["max_model_len"], facts["model_config"]
        self.model_name, self.eos_token_ids = facts["model_name"], facts["eos_token_ids"]
        # Grammars are compiled here first, so a bad schema is refused before any replica sees it.
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self.admission = Admission.of(self.model_config, self.max_model_len, config, self.grammars)
        self.last_step_error: str | None = None
        self._stats: list[dict[str, float]] = ray.get([r.stats.remote() for r in self.replicas])
        self.autoscaler: Autoscaler | None = None
        if config.autoscale:
            self.autoscaler = Autoscaler(AutoscaleConfig(*config.autoscale, config.ttft_slo, config.tpot_slo,
                                                         out_window_s=config.upscale_delay_s,
                                                         in_hold_s=config.downscale_delay_s), None)
        self.scale_outs = self.scale_ins = 0
        self._steps: deque[tuple[int, int, int, float]] = deque(maxlen=STEP_SAMPLES)
        self._fitted_at = 0  # samples seen when the step-time model was last fitted
        self.steps_run = 0
        self._next_tick = 0.0
        self._arrivals: deque[tuple[float, int]] = deque()  # (time, prompt tokens) of recent requests
        self.tick_s, self.refit_every = AUTOSCALE_TICK_S, REFIT_EVERY
        self.poll_s = POLL_S

    @staticmethod
    def _share_weights(inner: dict) -> tuple:
        """Load and convert the model once, here, and put it in the object store in chunks (the pool
        forwards them host to host in a chain); then drop this copy."""
        import ctypes
        import gc

        import ray

        from llmserve.cluster.shared_weights import pack
        from llmserve.cluster.weight_chain import WeightPool, cut
        from llmserve.engine.setup import build_engine_parts

        # num_kv_blocks=1: only the model is wanted from these parts (its rope tables are sized by the
        # model's own context, not by this tiny cache).
        parts = build_engine_parts(EngineConfig(**{**inner, "num_kv_blocks": 1, "kv_cache_memory": None,
                                                   "speculative_config": None}))
        skeleton, arrays = pack(parts.runner.model)
        refs = ray.put(skeleton), WeightPool(cut(arrays))
        del parts, arrays
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        return refs

    def replica_memory(self) -> list[dict[str, int]]:
        import ray

        return ray.get([r.memory.remote() for r in self.replicas])

    # ---- the engine interface ----------------------------------------------------------------
    def add_request(self, request_id: str, token_ids: list[int], params: SamplingParams | None = None, *,
                    prompt: str | None = None, priority: int = 0, cache_salt: str | None = None,
                    deadline: float | None = None, arrival_time: float | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self._live:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        self.admission.check(token_ids, params)  # a bad request is refused here, before any replica has it
        i = self._place(token_ids, params, cache_salt)
        i = self._submit(i, request_id, token_ids, params, prompt, priority, cache_salt, deadline, arrival_time)
        self._live[request_id] = _Tracked(list(token_ids), params, prompt, priority, cache_salt, i)
        if self.autoscaler is not None:  # pruned by tick, which only the autoscaler needs
            self._arrivals.append((time.monotonic(), len(token_ids)))

    def abort_request(self, ids: list[str] | str) -> None:
        by_replica: dict[int, list[str]] = {}
        for rid in [ids] if isinstance(ids, str) else list(ids):
            tracked = self._live.pop(rid, None)
            if tracked is not None:
                by_replica.setdefault(tracked.replica, []).append(rid)
        for i, rids in by_replica.items():
            self.abort_request_on_replica(rids, i)

    def has_unfinished_requests(self) -> bool:
        # _early: outputs a drain or migration collected between steps (a request's last among them).
        return bool(self._live) or bool(self._early)

    def step(self) -> list[RequestOutput]:
        import ray

        self._start_steps()  # replicas given work since the last step (or restarted, or newly started)
        outputs: list[RequestOutput] = []
        if not self._inflight and self._live:
            time.sleep(self.poll_s)  # every replica holding requests is restarting: do not spin
        if self._inflight:
            # While a replica is idle, waits a moment at most: a request arriving meanwhile must reach
            # it now, not after another replica's prompt chunk (the caller adds requests between steps).
            refs = list(self._inflight.values())
            idle = any(i not in self._inflight for i in self.serving)
            if ray.wait(refs, num_returns=1, timeout=self.poll_s if idle else None)[0]:
                self.last_step_error = None  # of the steps collected now (unchanged by a poll that found none)
                ready = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0])
                for i in [i for i, ref in self._inflight.items() if ref in ready]:
                    if i in self._inflight:  # a migration earlier in this loop may have collected it
                        self._collect(i, outputs)
        if not self.prefill:
            self._rebalance()
        self.tick()
        # Before the caller hands these outputs out: a replica computes its next step meanwhile. (Not
        # before migrations: a request leaving a replica would wait for that replica's new step.)
        self._start_steps()
        outputs = self._early + outputs  # collected before a request moved on: older than anything else of it
        self._early = []
        return outputs

    def _start_steps(self) -> None:
        """Every replica with work and no step in flight starts one."""
        for i in sorted({t.replica for t in self._live.values()} - set(self._down)):
            if i not in self._inflight:
                self._inflight[i] = self.replicas[i].step.remote()

    def _collect(self, i: int, outputs: list[RequestOutput]) -> None:
        """Take replica i's finished (or finishing) step: its outputs, load and step shape."""
        import ray

        ref = self._inflight.pop(i)
        try:
            step: ReplicaStep = ray.get(ref)
        except ray.exceptions.RayActorError:
            if i not in self._down and i not in self._retired:
                self._fail_over(i)
            return
        if step.incarnation != self._incarnations[i]:  # died and restarted between two steps: it holds none of its requests
            self._incarnations[i] = step.incarnation
            self._replaced(i)
            return
        self._settle(i, outputs)  # the calls Ray ran before this step (and any since)
        self.loads[i], self._stats[i] = step.load, step.stats
        if step.waited is not None:  # the replica had work and waited for this call: the front end's share of a step
            self.steps_waited += 1
            self.waited_s += step.waited
        if step.shape is not None:
            self._steps.append(step.shape)
            self.step_s += step.shape[-1]
            self.step_cpu_s += step.cpu_s
            if self.step_log is not None:
                self.step_log.append((i, *step.shape))
            self.steps_run += 1
        self.last_step_error = self.last_step_error or step.error
        for out in step.outputs:
            tracked = self._live.get(out.request_id)
            if tracked is None or tracked.replica != i:
                continue
            if out.finished and all(c.finish_reason == "abort" for c in out.outputs):
                # Replicas end requests as "abort" only when the front end asks, and it asks for a
                # request it still tracks only in _replaced, which starts that request again (maybe here).
                continue
            out = self._stitched(tracked, out)
            tracked.last = out
            outputs.append(out)
            if out.finished:
                del self._live[out.request_id]
            elif i in self.prefill and out.outputs[0].token_ids:  # its prompt is done: on to decode
                self.migrate(out.request_id, self._least_loaded(self.decode))

    def _settle(self, i: int, outputs: list[RequestOutput]) -> None:
        """Read what replica i's calls sent without waiting returned, those that have run. A request
        the replica refused after all ends with an error; a migrated one it refused starts over from
        what was streamed. A replica that died is left to its step's failover."""
        import ray

        calls = self._pending.pop(i, [])
        if not calls:
            return
        ready = set(ray.wait([ref for _, _, ref in calls], num_returns=len(calls), timeout=0)[0])
        if len(ready) < len(calls):  # sent while its step ran: read after the next
            self._pending[i] = [c for c in calls if c[2] not in ready]
            calls = [c for c in calls if c[2] in ready]
        for kind, rid, ref in calls:
            try:
                ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                t = self._live.get(rid)
                if kind == "abort" or t is None or t.replica != i:
                    continue
                logger.error("replica %d refused a %s request with %s", i, "migrated" if kind == "import" else "new",
                             type(e.cause).__name__)
                if kind == "import":
                    self._resubmit(rid, t)
                else:
                    del self._live[rid]
                    ended = [dataclasses.replace(c, finish_reason="error") for c in t.last.outputs] if t.last else [
                        CompletionOutput(k, "", [], finish_reason="error") for k in range(t.params.n)]
                    outputs.append(RequestOutput(rid, t.prompt, t.token_ids, ended, True))
            except ray.exceptions.RayActorError:
                pass

    def tick(self) -> None:
        """Between steps, and every idle tick of the loop: replicas that finished starting join, what
        idle replicas answered is read, and the autoscaler decides (at most once a second)."""
        self._check_restarted()
        for i in [i for i in self._pending if i not in self._inflight]:
            self._settle(i, self._early)
        now = time.monotonic()
        if self.autoscaler is None or now < self._next_tick:
            return
        self._next_tick = now + self.tick_s
        running = [t for t in self._live.values() if t.last is not None]
        if self.steps_run - self._fitted_at >= self.refit_every and len(self._steps) >= self.refit_every:
            from llmserve.cluster.planner import StepTimeModel

            mean_context = (sum(len(t.token_ids) + len(t.last.outputs[0].token_ids) for t in running) / len(running)
                            if running else 0.0)
            self.autoscaler.model = step_model(StepTimeModel.fit(list(self._steps)), mean_context)
            self._fitted_at = self.steps_run
        if any(i not in self._retired for i in self._down):
            return  # a replica is starting (or restarting): decide again once it serves
        while self._arrivals and self._arrivals[0][0] < now - ARRIVAL_WINDOW_S:
            self._arrivals.popleft()
        sample = LoadSample(now, len(self.serving), sum(len(t.token_ids) for t in self._live.values() if t.last is None),
                            len(running), sum(n for _, n in self._arrivals) / ARRIVAL_WINDOW_S)
        decision = self.autoscaler.decide(sample)
        logger.debug("autoscale: %s (predicted TTFT %.2f s, TPOT %.0f ms at %d replicas)", decision.reason,
                     decision.predicted_ttft_s, decision.predicted_tpot_s * 1e3, sample.replicas)
        if decision.delta > 0:
            index = self.add_replica(wait=False)
            self.scale_outs += 1
            logger.info("autoscale: out to %d replicas (replica %d starting): %s", sample.replicas + 1, index,
                        decision.reason)
        elif decision.delta < 0:
            serving = self.serving
            count = {i: 0 for i in serving}
            for t in self._live.values():
                if t.replica in count:
                    count[t.replica] += 1
            index = min(reversed(serving), key=count.get)  # the least busy, the newest of equals
            self.remove_replica(index)
            self.scale_ins += 1
            logger.info("autoscale: in to %d replicas (replica %d drained, %d requests moved): %s",
                        sample.replicas - 1, index, count[index], decision.reason)

    def _rebalance(self) -> None:
        """When one replica holds `imbalance` more requests than another, move its newest running
        one over (Llumnix's load balancing by migration)."""
        alive = self.serving
        if len(alive) < 2:
            return
        count = {i: 0 for i in alive}
        for t in self._live.values():
            if t.replica in count:
                count[t.replica] += 1
        busiest, idlest = max(alive, key=count.get), min(alive, key=count.get)
        if count[busiest] - count[idlest] > self.imbalance:
            newest = next(rid for rid, t in reversed(self._live.items()) if t.replica == busiest)
            self.migrate(newest, idlest)

    def add_replica(self, wait: bool = True) -> int:
        """Scale out: one more replica (mapping the host's shared weights); returns its index. With
        wait=False it takes requests only once it answers (tick), so no request waits on its start."""
        import ray

        self.replicas.append(self._start_replica(len(self.replicas)))
        index = len(self.replicas) - 1
        self.loads.append(ReplicaLoad())
        self._stats.append(dict(self._stats[0], num_running=0, num_waiting=0, kv_usage=0.0))
        self._incarnations.append(None)
        if wait:
            self._incarnations[index] = ray.get(self.replicas[index].hello.remote())
        else:
            self._down[index] = self.replicas[index].hello.remote()
        return index

    def remove_replica(self, replica: int) -> None:
        """Scale in: drain `replica` (its requests move on with their KV), then stop it for good."""
        import ray

        self.drain(replica)
        if replica in self._inflight:  # a step started before its last request left
            self._collect(replica, self._early)
        try:
            ray.get(self.replicas[replica].shutdown_engine.remote(), timeout=10)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            pass  # gone or stuck: nothing of it is worth waiting for
        ray.kill(self.replicas[replica], no_restart=True)
        self._down.pop(replica, None)
        self._pending.pop(replica, None)
        self._retired.add(replica)

    @property
    def serving(self) -> list[int]:
        gone = set(self._down) | self._draining | self._retired
        return [i for i in range(len(self.replicas)) if i not in gone]

    def drain(self, replica: int) -> None:
        """Stop placing requests on `replica` and move its running ones to the others (a replica
        that is being stopped, or scaled in). The last serving replica (of its role) is not drained:
        its requests would have nowhere to go."""
        others = [i for i in self.serving if i != replica and (i in self.prefill) == (replica in self.prefill)]
        moving = [rid for rid, t in self._live.items() if t.replica == replica]
        if not others and (replica in self.serving or moving):
            raise InvalidRequestError(f"replica {replica} is the last one serving its requests; add one before "
                                      "draining it")
        self._draining.add(replica)
        for rid in moving:
            self.migrate(rid, self._least_loaded(others))

    def migrate(self, request_id: str, to: int) -> None:
        """Move a running request, with its KV, to replica `to` (Llumnix-style live migration; also
        the prefill -> decode hand-off). Its stream goes on from the next step without a gap."""
        import ray

        t = self._live.get(request_id)
        if t is None or to == t.replica or to not in self.serving:
            return  # gone (finished in a step a migration just before this one collected), already there, or no
            # serving replica to go to (it stays where it is)
        source = t.replica
        if source in self._inflight:  # its step's outputs go out before anything the new replica sends
            self._collect(source, self._early)
            if request_id not in self._live or t.replica != source:
                return  # finished (or failed over) in that step
        start = time.perf_counter()
        state_ref, bytes_ref = self.replicas[source].export_request.options(num_returns=2).remote(request_id)
        try:
            self.transfer_bytes += ray.get(bytes_ref)  # exported (the source has no step in flight)
        except ray.exceptions.RayActorError:
            self._fail_over(source)  # it goes on elsewhere from what was streamed
            return
        except ray.exceptions.RayTaskError:
            return  # not there (its add was refused late: _settle ends it); nothing moved
        self.transfer_s += time.perf_counter() - start
        self.transfers += 1
        # Through the object store, not here; run on `to` before its next step, without waiting for its step now.
        self._send(to, "import", request_id, self.replicas[to].import_request.remote(state_ref))
        t.replica = to

    def _least_loaded(self, among: list[int]) -> int:
        alive = [i for i in among if i in self.serving] or among
        return min(alive, key=lambda i: (self.loads[i].sequences, self.loads[i].kv_usage, i))

    # ---- placement and failover ------------------------------------------------------------
    def _place(self, token_ids: list[int], params: SamplingParams, cache_salt: str | None) -> int:
        hashes, parent = [], None
        for b in range(len(token_ids) // self.block_size):
            parent = block_hash(parent, token_ids[b * self.block_size:(b + 1) * self.block_size], cache_salt)
            hashes.append(parent)
        features = RoutingFeatures(len(token_ids), params.max_tokens or 0, params.n, tuple(hashes))
        serving = self.serving
        alive = [i for i in (self.prefill or range(len(self.replicas))) if i in serving]
        if not alive:
            raise EngineDeadError("no replica is serving")
        return alive[self.router.choose(features, [self.loads[i] for i in alive])]

    def _submit(self, i: int, request_id: str, token_ids: list[int], params: SamplingParams, prompt: str | None,
                priority: int, cache_salt: str | None, deadline: float | None = None,
                arrival_time: float | None = None) -> int:
        """Hand the request to replica i without waiting for it (its answer is read after its next
        step; if i turns out dead, its failover places the request again); the replica it went to."""
        self._send(i, "add", request_id, self.replicas[i].add_request.remote(
            request_id, token_ids, params, prompt, priority, cache_salt, deadline, arrival_time))
        self.loads[i].waiting += params.n
        return i

    def _send(self, i: int, kind: str, request_id: str, ref) -> None:
        self._pending.setdefault(i, []).append((kind, request_id, ref))

    def _fail_over(self, dead: int) -> None:
        """Move every request of a dead replica to live ones, from what was already streamed."""
        self._inflight.pop(dead, None)
        self._pending.pop(dead, None)  # what it was sent went with it: its requests are placed again below
        self._down[dead] = self.replicas[dead].hello.remote()  # answers once Ray has restarted it
        self.restarts += 1
        moved = [(rid, t) for rid, t in self._live.items() if t.replica == dead]
        if moved:
            # A call sent after the death (an add) may have reached the restarted instance: ended there
            # before it takes anything else (its abort output is dropped in _collect).
            self._send(dead, "abort", "", self.replicas[dead].abort_request.remote([rid for rid, _ in moved]))
        for rid, t in moved:
            self._resubmit(rid, t)

    def _replaced(self, i: int) -> None:
        """Replica i was restarted without a call failing: whatever reached the new instance is ended
        there (the aborts run before anything sent next), and its requests go on from what was streamed."""
        self._pending.pop(i, None)
        self.restarts += 1
        moved = [(rid, t) for rid, t in self._live.items() if t.replica == i]
        logger.warning("replica %d was restarted between steps; %d requests continue from what was streamed",
                       i, len(moved))
        if moved:
            self.abort_request_on_replica([rid for rid, _ in moved], i)
        for rid, t in moved:
            self._resubmit(rid, t)

    def _resubmit(self, rid: str, t: _Tracked) -> None:
        """Start a request again on a serving replica as its prompt plus what was already streamed."""
        done = t.last.outputs[0] if t.last is not None and t.params.n == 1 else None
        generated = list(done.token_ids) if done is not None else []
        params = dataclasses.replace(t.params)
        if generated:  # continue after what the client has: the same prompt, less budget
            params.max_tokens = max(1, t.params.max_tokens - len(generated)) if t.params.max_tokens else None
            params.min_tokens = max(0, (t.params.min_tokens or 0) - len(generated))
            # Stitched onto everything streamed so far: an earlier hand-over's `before` is part of it.
            t.before, t.fed = done, 0
            t.detok = IncrementalDetokenizer(self.tokenizer, t.token_ids[-PROMPT_TAIL:], t.params.stop,
                                             t.params.include_stop_str_in_output, t.params.skip_special_tokens)
            for token in generated:
                t.detok.add(token)
        tokens = t.token_ids + generated
        t.replica = self._submit(self._place(tokens, params, t.cache_salt), rid, tokens, params, None, t.priority,
                                 t.cache_salt)

    def _stitched(self, t: _Tracked, out: RequestOutput) -> RequestOutput:
        if t.before is None:
            return out
        b, c = t.before, out.outputs[0]
        new = list(c.token_ids)
        finished, reason, stop = out.finished, c.finish_reason, c.stop_reason
        for k in range(t.fed, len(new)):
            if t.detok.add(new[k]):  # a stop string across the hand-over: the front ends it here
                new, finished, reason, stop = new[:k + 1], True, "stop", t.detok.stop_string
                self.abort_request_on_replica([out.request_id], t.replica)
                break
        t.fed = len(new)
        merged = dataclasses.replace(
            c, token_ids=list(b.token_ids) + new, text=t.detok.visible_text(finished), finish_reason=reason,
            stop_reason=stop,
            logprobs=(list(b.logprobs) + list(c.logprobs)[:len(new)])
            if b.logprobs is not None and c.logprobs is not None else None)
        return dataclasses.replace(out, prompt=t.prompt, prompt_token_ids=t.token_ids, outputs=[merged],
                                   finished=finished)

    def abort_request_on_replica(self, request_ids: list[str], replica: int) -> None:
        """Without waiting for the replica's step in flight (a replica that dies ends them anyway)."""
        if replica in self._down or replica in self._retired:
            return
        self._send(replica, "abort", "", self.replicas[replica].abort_request.remote(request_ids))

    def _check_restarted(self) -> None:
        import ray

        for i, probe in list(self._down.items()):
            ready, _ = ray.wait([probe], timeout=0)
            if ready:
                try:
                    self._incarnations[i] = ray.get(ready[0])
                    del self._down[i]
                    self.loads[i] = ReplicaLoad()
                except ray.exceptions.RayActorError:
                    if self.placed[i] not in self._live_nodes():
                        # Pinned to a node that is gone, Ray cannot restart it: start it afresh on a live one.
                        ray.kill(self.replicas[i], no_restart=True)
                        self.replicas[i] = self._start_replica(i)
                    self._down[i] = self.replicas[i].hello.remote()

    @staticmethod
    def _live_nodes() -> list[str]:
        import ray

        return sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])

    def _node_for(self, index: int) -> str:
        """Replica `index`'s node: the cluster's live nodes in turn."""
        nodes = self._live_nodes()
        return nodes[index % len(nodes)]

    def _start_replica(self, index: int):
        """Replica `index` on its node, mapping the weights held there (forwarded first if that
        host lacks them)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = self._node_for(index)
        # Hard: a soft affinity lets Ray place it on another node while this one's resources are not yet
        # in its view. Ray restarts a crashed replica on the same node; one whose node died is started
        # afresh by _check_restarted.
        strategy = NodeAffinitySchedulingStrategy(node, soft=False)
        shared = (self.skeleton, self.weights.refs_on(node)) if self.weights is not None else ()
        if index < len(self.placed):
            self.placed[index] = node
        else:
            self.placed.append(node)
        return self._actor.options(scheduling_strategy=strategy).remote(self._inner, *shared)

    # ---- stats and shutdown ------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """The replicas' engine stats summed (KV usage: their mean)."""
        total: dict[str, float] = {}
        live = [s for i, s in enumerate(self._stats) if i not in self._retired]
        for s in live:
            for k, v in s.items():
                total[k] = total.get(k, 0.0) + v
        if "kv_usage" in total:
            total["kv_usage"] /= len(live)
        return total

    def replica_stats(self) -> list[tuple[int, int, float, bool]]:
        """(running, waiting, KV usage, serving) per replica, as of its last step."""
        return [(int(s.get("num_running", 0)), int(s.get("num_waiting", 0)), float(s.get("kv_usage", 0.0)),
                 i in self.serving) for i, s in enumerate(self._stats)]

    def prefix_stats(self) -> tuple[int, int]:
        import ray

        stats = ray.get([r.prefix_stats.remote() for r in self.replicas])
        return sum(q for q, _ in stats), sum(h for _, h in stats)

    def kv_all_free(self) -> bool:
        import ray

        return all(ray.get([r.kv_free.remote() for i, r in enumerate(self.replicas) if i not in self._retired]))

    def replica_nodes(self) -> list[str]:
        import ray

        return ray.get([r.node_id.remote() for r in self.replicas])

    def replica_pids(self) -> list[int]:
        import ray

        return ray.get([r.pid.remote() for r in self.replicas])

    def shutdown(self) -> None:
        import ray

        live = [r for i, r in enumerate(self.replicas) if i not in self._retired]
        try:
            ray.get([r.shutdown_engine.remote() for r in live], timeout=10)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            pass  # a replica that is gone or stuck keeps nothing worth waiting for
        for r in live:
            ray.kill(r, no_restart=True)
        if self.weights is not None:
            self.weights.shutdown()
        if self.session is not None:
            self.session.shutdown()
