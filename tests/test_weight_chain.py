"""Weights forwarded host to host in a chain, on several Ray nodes of this machine (each its own
raylet and object store): every host ends up with identical bytes in its own store, and a host that
dies mid-chain is routed around."""
from __future__ import annotations

import hashlib
import os
import threading
import time

import numpy as np
import pytest

from llmserve.cluster.weight_chain import WeightPool, cut, joined


def test_cut_keeps_order_and_bounds_chunks():
    arrays = [np.full(n, i, dtype=np.uint8) for i, n in enumerate([300, 300, 500, 2000, 100, 100])]
    chunks = cut(arrays, chunk_bytes=700)
    assert [sum(a.nbytes for a in c) for c in chunks] == [600, 500, 2000, 200]  # a big array is a chunk alone
    assert [a is b for a, b in zip(joined(chunks), arrays)] == [True] * 6
    assert cut([], 700) == []


@pytest.fixture(scope="module")
def cluster():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                      "object_store_memory": 96 << 20})
    for _ in range(3):
        c.add_node(num_cpus=1, object_store_memory=96 << 20)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def _arrays(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, size=n, dtype=np.uint8) for n in [400_000] * 9 + [1_200_000]]


def _digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _digest_on(node: str, refs: list) -> str:
    """The chunks read by a task on `node` (they are that host's copies)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def read(chunk_refs):  # self-contained: the workers cannot import this test module
        import hashlib as hashing

        import numpy

        h = hashing.sha256()
        for chunk in ray.get(list(chunk_refs)):
            for a in chunk:
                h.update(numpy.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    return ray.get(read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(refs))


def _workers(cluster) -> list:
    return [n for n in cluster.list_all_nodes() if n is not cluster.head_node]


def test_chain_fills_every_host_with_identical_bytes_in_its_own_store(cluster):
    import ray

    arrays = _arrays(0)
    pool = WeightPool(cut(arrays, chunk_bytes=1_000_000))
    try:
        nodes = [n.node_id for n in _workers(cluster)]
        pool.distribute(nodes)
        assert sorted(pool.hosts()) == sorted([pool.source, *nodes])
        assert pool.stats.rounds == 1 and pool.stats.hops == 3 * pool.num_chunks
        assert pool.stats.bytes == 3 * sum(a.nbytes for a in arrays)
        want = _digest(arrays)
        for node in nodes:
            refs = pool.refs_on(node)  # held already: nothing forwarded again
            locations = ray.experimental.get_object_locations(refs)
            assert all(node in locations[r]["node_ids"] for r in refs)  # a copy in that host's own store
            assert _digest_on(node, refs) == want
        assert pool.stats.hops == 3 * pool.num_chunks
    finally:
        pool.shutdown()


def test_a_host_that_dies_mid_chain_is_routed_around(cluster):
    arrays = _arrays(1)
    # ~0.25 s a hop (rate cap), 5 chunks: the chain runs for well over a second.
    pool = WeightPool(cut(arrays, chunk_bytes=1_000_000), max_bytes_per_s=4e6)
    first, *rest = _workers(cluster)
    order = [first.node_id] + [n.node_id for n in rest]
    try:
        done: list[BaseException | None] = []

        def run():
            try:
                pool.distribute(order)
                done.append(None)
            except BaseException as e:  # noqa: BLE001 - handed to the test thread
                done.append(e)

        t = threading.Thread(target=run)
        t.start()
        time.sleep(0.6)  # the first host holds a chunk or two; the ones behind it fewer
        cluster.remove_node(first)
        t.join(timeout=180)
        assert done == [None]
        assert first.node_id not in pool.hosts() and first.node_id in pool.stats.lost_hosts
        assert pool.stats.rounds >= 2
        want = _digest(arrays)
        for node in order[1:]:
            assert node in pool.hosts()
            assert _digest_on(node, pool.refs_on(node)) == want
    finally:
        pool.shutdown()
