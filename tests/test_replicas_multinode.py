"""Replicas on different Ray nodes (several raylets with their own object stores, on this machine,
through ray.cluster_utils.Cluster): disaggregation and live migration across nodes."""
from __future__ import annotations

import os

import pytest

from llmserve.sampling_params import SamplingParams
from tiny_models import llama_config, make_llm, make_model_folder, random_prompts


@pytest.fixture(scope="module")
def cluster():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                      "object_store_memory": 128 << 20})
    c.add_node(num_cpus=1, object_store_memory=128 << 20)
    c.wait_for_nodes()
    yield c
    import ray

    ray.shutdown()
    c.shutdown()


def test_disaggregation_and_migration_across_nodes(cluster, tmp_path):
    make_model_folder(tmp_path, llama_config())
    prompts = random_prompts(4, [12, 30, 5, 21], seed=21)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in make_llm(tmp_path).generate(prompts, params, use_tqdm=False)]
    llm = make_llm(tmp_path, prefill_replicas=1, decode_replicas=1, ray_address=cluster.address)
    try:
        engine = llm.engine
        assert len(set(engine.replica_nodes())) == 2  # one replica per node
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert got == want and engine.transfers == len(prompts) and engine.transfer_bytes > 0
        assert engine.kv_all_free()
    finally:
        llm.shutdown()
