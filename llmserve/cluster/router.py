"""Where a request goes among replicas. A router sees RoutingFeatures (what the request asks to
compute) and each replica's load, nothing that identifies a user (privacy/routing.py).

  round_robin     in turn
  least_load      the replica with the fewest waiting + running sequences (KV usage breaks ties)
  power_of_two    two replicas at random, the less loaded of them
  prefix_affinity the replica that holds the longest run of the request's salted block hashes
                  (remembered from what the router sent where, as SGLang's cache-aware router does),
                  unless loads differ by more than `imbalance` sequences: then least load
"""
from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass

from llmserve.privacy.routing import RoutingFeatures

ROUTERS = ("round_robin", "least_load", "power_of_two", "prefix_affinity")


@dataclass
class ReplicaLoad:
    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0

    @property
    def sequences(self) -> int:
        return self.waiting + self.running


def _least(loads: list[ReplicaLoad], among: list[int] | None = None) -> int:
    among = among if among is not None else list(range(len(loads)))
    return min(among, key=lambda i: (loads[i].sequences, loads[i].kv_usage, i))


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def choose(self, features: RoutingFeatures, loads: list[ReplicaLoad]) -> int:
        i, self._next = self._next % len(loads), self._next + 1
        return i


class LeastLoad:
    def choose(self, features: RoutingFeatures, loads: list[ReplicaLoad]) -> int:
        return _least(loads)


class PowerOfTwo:
    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def choose(self, features: RoutingFeatures, loads: list[ReplicaLoad]) -> int:
        if len(loads) == 1:
            return 0
        return _least(loads, self._rng.sample(range(len(loads)), 2))


class PrefixAffinity:
    def __init__(self, imbalance: int = 8, capacity: int = 1 << 16) -> None:
        self.imbalance, self.capacity = imbalance, capacity
        self._where: OrderedDict[bytes, int] = OrderedDict()  # block hash -> replica it was sent to (LRU)

    def choose(self, features: RoutingFeatures, loads: list[ReplicaLoad]) -> int:
        counts = [load.sequences for load in loads]
        if max(counts) - min(counts) > self.imbalance:
            choice = _least(loads)
        else:
            best, best_run = None, 0
            for i in range(len(loads)):
                run = 0
                for h in features.prefix_hashes:
                    if self._where.get(h) != i:
                        break
                    run += 1
                if run > best_run:
                    best, best_run = i, run
            choice = best if best is not None else _least(loads)
        for h in features.prefix_hashes:
            self._where[h] = choice
            self._where.move_to_end(h)
        while len(self._where) > self.capacity:
            self._where.popitem(last=False)
        return choice


def make_router(name: str, seed: int = 0):
    if name == "round_robin":
        return RoundRobin()
    if name == "least_load":
        return LeastLoad()
    if name == "power_of_two":
        return PowerOfTwo(seed)
    if name == "prefix_affinity":
        return PrefixAffinity()
    raise ValueError(f"router must be one of {ROUTERS}, not {name!r}")
