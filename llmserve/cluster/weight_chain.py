"""Weights forwarded host to host in a chain (BlitzScale's serial-forwarding multicast), and the
pool that knows which host holds them.

The model's tensors (shared_weights.pack) are cut into chunks of about `chunk_bytes`. Hosts that
lack them are put in a chain behind a host that holds them: the first pulls chunk i from the holder,
the second pulls chunk i from the first as soon as the first has it, and so on. Every link carries
each chunk once and all links are busy at once, so filling n hosts takes about one copy's time plus
n chunk times, not n copies' time, and no one host sends more than one copy.

A hop is a task of a small agent actor pinned to its host: it takes the previous host's chunk as its
argument (Ray pulls it from that host's object store) and returns it, which stores the chunk in its
own host's object store, for the next hop and for the replicas on that host (who map it from there).
The pool records, chunk by chunk, which host holds which chunk. A host that dies mid-chain is routed
around: the hosts behind it keep the chunks they already have and get the rest in a new chain from a
host that holds them (at worst the first one).

The pool lives with the front that places the replicas: it owns the chunks' references, so the
chunks live as long as it does.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

DEFAULT_CHUNK_BYTES = 32 << 20


def cut(arrays: list[np.ndarray], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[list[np.ndarray]]:
    """Consecutive arrays grouped into chunks of about chunk_bytes (a larger array is a chunk alone)."""
    chunks: list[list[np.ndarray]] = [[]]
    size = 0
    for a in arrays:
        if chunks[-1] and size + a.nbytes > chunk_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(a)
        size += a.nbytes
    return chunks if chunks[0] else []


def joined(chunks: list[list[np.ndarray]]) -> list[np.ndarray]:
    return [a for chunk in chunks for a in chunk]


class HostAgent:
    """The chain's hop on one host (a Ray actor pinned there, no CPU reserved)."""

    def __init__(self, max_bytes_per_s: float | None = None) -> None:
        self.max_bytes_per_s = max_bytes_per_s

    def hold(self, chunk: list[np.ndarray]) -> tuple[list[np.ndarray], int]:
        """The chunk, pulled from the previous host, stored again here (the first return value);
        and its size, a small value the front reads to learn that the hop is done."""
        start = time.perf_counter()
        size = sum(a.nbytes for a in chunk)
        if self.max_bytes_per_s:  # a rate cap, so a distribution leaves bandwidth to serving traffic
            time.sleep(max(0.0, size / self.max_bytes_per_s - (time.perf_counter() - start)))
        return chunk, size

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


@dataclass
class ChainStats:
    rounds: int = 0  # chains run (more than one when a host died mid-chain)
    hops: int = 0  # chunks forwarded
    bytes: int = 0
    seconds: float = 0.0
    lost_hosts: list[str] = field(default_factory=list)


class WeightPool:
    """Which host holds which chunk of one model's weights, and the chains that fill the others."""

    def __init__(self, chunks: list[list[np.ndarray]], max_bytes_per_s: float | None = None) -> None:
        import ray

        self.source = ray.get_runtime_context().get_node_id()
        self.held: dict[str, list] = {self.source: [ray.put(c) for c in chunks]}
        self.max_bytes_per_s = max_bytes_per_s
        self._agents: dict[str, object] = {}
        self.stats = ChainStats()

    @property
    def num_chunks(self) -> int:
        return len(self.held[self.source]) if self.source in self.held else len(next(iter(self.held.values())))

    def hosts(self) -> list[str]:
        """Hosts holding every chunk."""
        return [n for n, refs in self.held.items() if all(r is not None for r in refs)]

    def refs_on(self, node: str) -> list:
        """The chunks' references on `node`, forwarding them there first if it lacks them (if that
        host died meanwhile, another host's: Ray pulls them to wherever the replica runs)."""
        if node not in self.hosts():
            self.distribute([node])
        return list(self.held[node] if node in self.hosts() else self.held[self.hosts()[0]])

    def distribute(self, nodes: list[str]) -> None:
        """Fill every node of `nodes` that lacks chunks, chained; a node that dies is dropped."""
        import ray

        todo = [n for n in dict.fromkeys(nodes) if n not in self.hosts()]
        rounds = 0
        while todo:
            holders = self.hosts()
            if not holders:
                raise RuntimeError("no live host holds the weights")
            rounds += 1
            if rounds > len(nodes) + 2:  # every round loses a host or fills the rest: this is not that
                raise RuntimeError(f"weights could not be forwarded to {len(todo)} live host(s)")
            start = time.perf_counter()
            previous = self.held[holders[0]]
            pending: dict[str, list] = {}  # node -> per chunk: the size ref of its hop, or None (had it)
            for node in todo:
                refs = self.held.setdefault(node, [None] * self.num_chunks)
                agent = self._agent(node)
                sizes: list = [None] * self.num_chunks
                for i in range(self.num_chunks):
                    if refs[i] is None:  # chunk i from the previous hop of the chain (whatever it holds)
                        refs[i], sizes[i] = agent.hold.options(num_returns=2).remote(previous[i])
                pending[node] = sizes
                previous = refs
            self.stats.rounds += 1
            failed: set[str] = set()
            for node, sizes in pending.items():
                for i, ref in enumerate(sizes):
                    if ref is None:
                        continue
                    try:
                        self.stats.bytes += ray.get(ref)
                        self.stats.hops += 1
                    except ray.exceptions.RayError:
                        self.held[node][i] = None  # lost here or upstream: comes again next round
                        failed.add(node)
            self.stats.seconds += time.perf_counter() - start
            for node in failed:
                if not self._alive(node):
                    self.drop(node)
            todo = [n for n in todo if n in self.held and n not in self.hosts()]

    def drop(self, node: str) -> None:
        """Forget a host (dead, or leaving): chains no longer start from or pass through it."""
        import ray

        self.held.pop(node, None)
        self.stats.lost_hosts.append(node)
        agent = self._agents.pop(node, None)
        if agent is not None:
            ray.kill(agent, no_restart=True)

    def _alive(self, node: str) -> bool:
        import ray

        if not any(n["NodeID"] == node and n["Alive"] for n in ray.nodes()):
            return False
        try:
            ray.get(self._agent(node).node_id.remote(), timeout=30)
            return True
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            return False

    def _agent(self, node: str):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if node not in self._agents:
            self._agents[node] = ray.remote(num_cpus=0, max_restarts=0)(HostAgent).options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(self.max_bytes_per_s)
        return self._agents[node]

    def shutdown(self) -> None:
        import ray

        for agent in self._agents.values():
            ray.kill(agent, no_restart=True)
        self._agents.clear()
        self.held.clear()
