"""Engine replicas as Ray actors, each an LLMEngine in its own process with its share of the
threads, behind the engine's own interface (add_request, abort_request, step,
has_unfinished_requests), so LLM(..., replicas=N) runs unchanged on top of them.

A step steps every replica with work at once (one remote call each, gathered), so replicas
compute in parallel; each returns its outputs and its load, which the router reads.
"""
from __future__ import annotations

import dataclasses
import os

from llmserve.cluster.router import ReplicaLoad, make_router
from llmserve.config import EngineConfig
from llmserve.engine.kv_cache import block_hash
from llmserve.outputs import RequestOutput
from llmserve.privacy.routing import RoutingFeatures
from llmserve.sampling_params import SamplingParams


class EngineReplica:
    """One engine (the Ray actor's body)."""

    def __init__(self, config: dict) -> None:
        from llmserve.engine.engine import LLMEngine

        self.engine = LLMEngine(EngineConfig(**config))

    def add_request(self, request_id: str, token_ids: list[int], params: SamplingParams, prompt: str | None,
                    priority: int, cache_salt: str | None, deadline: float | None,
                    arrival_time: float | None) -> None:
        self.engine.add_request(request_id, token_ids, params, prompt=prompt, priority=priority, cache_salt=cache_salt,
                                deadline=deadline, arrival_time=arrival_time)

    def abort_request(self, ids: list[str]) -> None:
        self.engine.abort_request(ids)

    def step(self) -> tuple[list[RequestOutput], ReplicaLoad, dict[str, float], str | None]:
        outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
        return outputs, self.load(), self.engine.stats(), self.engine.last_step_error

    def stats(self) -> dict[str, float]:
        return self.engine.stats()

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


class ReplicatedEngine:
    """N EngineReplica actors and a router, with the engine interface LLM uses."""

    def __init__(self, config: EngineConfig, threads: int | None = None) -> None:
        import ray

        from llmserve.cluster.local_ray import start_ray
        from llmserve.model.resolve import resolve_model_folder
        from llmserve.tokenizer import load_tokenizer

        n = config.replicas
        total = threads or int(os.environ.get("LLMSERVE_NUM_THREADS", 0)) or os.cpu_count() or 1
        per = max(1, total // n)
        self.session = start_ray(num_cpus=max(total, n), address=config.ray_address) if not ray.is_initialized() else None
        folder = resolve_model_folder(config.model)  # converted here once, not by each replica at the same time
        self.tokenizer = load_tokenizer(config.tokenizer or folder)
        inner = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        inner.update(replicas=1, ray_address=None)
        actor = ray.remote(num_cpus=per, runtime_env={"env_vars": {"LLMSERVE_NUM_THREADS": str(per)}})(EngineReplica)
        self.replicas = [actor.remote(inner) for _ in range(n)]
        self.loads = [ReplicaLoad() for _ in range(n)]
        self.router = make_router(config.router, seed=config.seed or 0)
        self.block_size = config.block_size
        self._owner: dict[str, int] = {}  # request id -> replica
        self._busy = [0] * n
        ray.get([r.pid.remote() for r in self.replicas])  # every replica's engine is built
        facts = ray.get(self.replicas[0].facts.remote())
        self.max_model_len, self.model_config = facts["max_model_len"], facts["model_config"]
        self.model_name, self.eos_token_ids = facts["model_name"], facts["eos_token_ids"]
        from llmserve.structured.compiler import GrammarCompiler

        # Grammars are compiled here first, so a bad schema is refused before any replica sees it.
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self.last_step_error: str | None = None
        self._stats: list[dict[str, float]] = ray.get([r.stats.remote() for r in self.replicas])

    def add_request(self, request_id: str, token_ids: list[int], params: SamplingParams | None = None, *,
                    prompt: str | None = None, priority: int = 0, cache_salt: str | None = None,
                    deadline: float | None = None, arrival_time: float | None = None) -> None:
        import ray

        params = params or SamplingParams()
        hashes, parent = [], None
        for i in range(len(token_ids) // self.block_size):
            parent = block_hash(parent, token_ids[i * self.block_size:(i + 1) * self.block_size], cache_salt)
            hashes.append(parent)
        features = RoutingFeatures(len(token_ids), params.max_tokens or 0, params.n, tuple(hashes))
        i = self.router.choose(features, self.loads)
        try:
            ray.get(self.replicas[i].add_request.remote(request_id, token_ids, params, prompt, priority, cache_salt,
                                                        deadline, arrival_time))
        except ray.exceptions.RayTaskError as e:  # a refusal (validation) comes back as the replica raised it
            raise e.cause from None
        self._owner[request_id] = i
        self._busy[i] += 1
        self.loads[i].waiting += params.n

    def abort_request(self, ids: list[str] | str) -> None:
        import ray

        ids = [ids] if isinstance(ids, str) else list(ids)
        by_replica: dict[int, list[str]] = {}
        for rid in ids:
            if rid in self._owner:
                by_replica.setdefault(self._owner.pop(rid), []).append(rid)
        ray.get([self.replicas[i].abort_request.remote(r) for i, r in by_replica.items()])
        for i, r in by_replica.items():
            self._busy[i] -= len(r)

    def has_unfinished_requests(self) -> bool:
        return any(self._busy)

    def step(self) -> list[RequestOutput]:
        import ray

        active = [i for i, b in enumerate(self._busy) if b]
        results = ray.get([self.replicas[i].step.remote() for i in active])
        outputs = []
        self.last_step_error = None
        for i, (outs, load, stats, error) in zip(active, results):
            self.loads[i], self._stats[i] = load, stats
            self.last_step_error = self.last_step_error or error
            for out in outs:
                outputs.append(out)
                if out.finished and self._owner.pop(out.request_id, None) is not None:
                    self._busy[i] -= 1
        return outputs

    def stats(self) -> dict[str, float]:
        """The replicas' engine stats summed (KV usage: their mean)."""
        total: dict[str, float] = {}
        for s in self._stats:
            for k, v in s.items():
                total[k] = total.get(k, 0.0) + v
        if "kv_usage" in total:
            total["kv_usage"] /= len(self._stats)
        return total

    def prefix_stats(self) -> tuple[int, int]:
        import ray

        stats = ray.get([r.prefix_stats.remote() for r in self.replicas])
        return sum(q for q, _ in stats), sum(h for _, h in stats)

    def kv_all_free(self) -> bool:
        import ray

        return all(ray.get([r.kv_free.remote() for r in self.replicas]))

    def shutdown(self) -> None:
        import ray

        for r in self.replicas:
            ray.kill(r)
        if self.session is not None:
            self.session.shutdown()
