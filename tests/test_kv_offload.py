"""The KV disk tier (engine/kv_offload.py): prefix blocks evicted from memory are written to disk and
read back on a hit, giving what recomputing them gives; the tier keeps to its size; in private mode
its files hold no plaintext KV and are gone after shutdown."""
from __future__ import annotations

from pathlib import Path

import pytest

from llmserve.config import EngineConfig
from llmserve.engine.engine import LLMEngine
from llmserve.engine.kv_offload import DiskKVTier
from llmserve.privacy.threats import private_config
from llmserve.sampling_params import SamplingParams
from tiny_models import llama_config, make_llm, make_model_folder, random_prompts

BLOCK = 4
PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("kv-offload-llama")
    make_model_folder(path, llama_config(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=128), seed=5)
    return path


def _chosen(out) -> list[float]:
    c = out.outputs[0]
    return [pos[t][0] for t, pos in zip(c.token_ids, c.logprobs)]


def test_a_prefix_evicted_to_disk_is_read_back_and_equals_recomputing_it(folder, tmp_path):
    llm = make_llm(folder, block_size=BLOCK, num_kv_blocks=24, kv_offload_dir=str(tmp_path / "tier"))
    engine = llm.engine
    prompt = random_prompts(1, [40], seed=1)[0]
    first = llm.generate([prompt], PARAMS, use_tqdm=False)[0]
    for filler in random_prompts(3, [40, 40, 40], seed=2):  # 12 blocks each: the first prompt's are evicted
        llm.generate([filler], PARAMS, use_tqdm=False)
    assert len(engine.tier) >= 9 and engine.tier.bytes_written > 0
    before = engine.kv.disk_hits
    again = llm.generate([prompt], PARAMS, use_tqdm=False)[0]
    assert again.num_cached_tokens == 36  # every full block of the prompt but the last token's
    assert engine.kv.disk_hits - before == 36 and engine.tier.hits >= 9
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    recompute = make_llm(folder, block_size=BLOCK, num_kv_blocks=24, enable_prefix_caching=False)
    ref = recompute.generate([prompt], PARAMS, use_tqdm=False)[0]
    assert again.outputs[0].token_ids == ref.outputs[0].token_ids
    assert _chosen(again) == pytest.approx(_chosen(ref), abs=1e-4)
    stats = engine.stats()
    assert stats["prefix_cache_disk_hits"] == engine.kv.disk_hits and stats["kv_offload_bytes_read"] > 0
    tier_dir = engine.tier.dir
    assert any(tier_dir.iterdir())
    llm.shutdown()
    assert not tier_dir.exists()


def test_the_tier_keeps_to_its_size(folder, tmp_path):
    block_bytes = len(make_llm(folder, block_size=BLOCK, num_kv_blocks=4).engine.runner.read_block(0))
    bound = 5 * block_bytes + 100
    llm = make_llm(folder, block_size=BLOCK, num_kv_blocks=16, kv_offload_dir=str(tmp_path / "tier"),
                   kv_offload_bytes=bound)
    tier = llm.engine.tier
    for prompt in random_prompts(8, [30] * 8, seed=4):
        llm.generate([prompt], PARAMS, use_tqdm=False)
        on_disk = sum(f.stat().st_size for f in tier.dir.iterdir())
        assert on_disk == tier.bytes_stored <= bound
    assert tier.bytes_written > bound and len(tier) == 5


def _private_engine(folder, tier_root: Path) -> LLMEngine:
    return LLMEngine(private_config(EngineConfig(model=str(folder), device="cpu", dtype="float32", block_size=BLOCK,
                                                 num_kv_blocks=24, kv_offload_dir=str(tier_root))))


def _run(engine: LLMEngine, prompt: list[int], rid: str) -> None:
    engine.add_request(rid, prompt, PARAMS, cache_salt="a client's own secret")
    while engine.has_unfinished_requests():
        engine.step()


@pytest.mark.parametrize("private", [False, True])
def test_private_tier_files_hold_no_plaintext_and_go_at_shutdown(folder, tmp_path, private):
    if private:
        engine = _private_engine(folder, tmp_path / "tier")
    else:
        engine = make_llm(folder, block_size=BLOCK, num_kv_blocks=24, kv_offload_dir=str(tmp_path / "tier")).engine
    tier = engine.tier
    assert tier.encrypted is private
    stored: list[bytes] = []
    original = tier.store
    tier.store = lambda h, data: (stored.append(data), original(h, data))[1]
    prompts = random_prompts(4, [40] * 4, seed=6)
    for i, prompt in enumerate(prompts):
        _run(engine, prompt, f"r{i}")
    assert stored, "nothing was offloaded"
    files = b"".join(f.read_bytes() for f in tier.dir.iterdir())
    # A 64-byte window of a block's K/V as the runner gave it: found in plain files, not in sealed ones.
    found = any(data[i:i + 64] in files for data in stored for i in range(0, len(data) - 64, 512))
    assert found is not private
    # and a block read back through the tier gives the same output as computing it again
    _run(engine, prompts[0], "again")
    assert tier.hits > 0
    tier_dir = tier.dir
    engine.shutdown()
    assert not tier_dir.exists() and tier.load(b"x" * 16) is None


def test_a_tampered_file_is_not_read_back(tmp_path):
    tier = DiskKVTier(tmp_path, 1 << 20, encrypt=True)
    tier.store(b"h" * 16, b"k" * 100)
    assert tier.load(b"h" * 16) == b"k" * 100
    path = next(tier.dir.iterdir())
    raw = bytearray(path.read_bytes())
    raw[20] ^= 1
    path.write_bytes(bytes(raw))
    assert tier.load(b"h" * 16) is None and len(tier) == 0
    tier.close()
