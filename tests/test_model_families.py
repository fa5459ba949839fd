"""Gemma 3, Qwen3 and sliding windows (Mistral, Qwen2) against transformers, token for token:
random tiny configs, prompts longer than the window in a batch of mixed lengths, chunk budgets 7
and 64, prefix caching on and off, and preemption under a tiny KV budget."""
from __future__ import annotations

import pytest

from llmserve.errors import UnsupportedArchitectureError
from llmserve.model.arch_config import FULL, SLIDING, ArchConfig
from llmserve.sampling_params import SamplingParams
from tiny_models import BOS_ID, EOS_ID, VOCAB_SIZE, hf_greedy, make_llm, make_model_folder, random_prompts

WINDOW = 16
STEPS = 64
COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
              initializer_range=0.2)


def gemma3_config():
    from transformers import Gemma3TextConfig

    # 2 local : 1 global, different bases, a query scalar other than head_dim, tied embeddings
    return Gemma3TextConfig(**COMMON, num_hidden_layers=3, head_dim=32, sliding_window=WINDOW,
                            layer_types=[SLIDING, SLIDING, FULL], query_pre_attn_scalar=24,
                            rope_parameters={SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
                                             FULL: {"rope_type": "default", "rope_theta": 1000000.0}},
                            tie_word_embeddings=True)


def qwen3_config():
    from transformers import Qwen3Config

    return Qwen3Config(**COMMON, num_hidden_layers=2, head_dim=32, tie_word_embeddings=False)


def mistral_config():
    from transformers import MistralConfig

    return MistralConfig(**COMMON, num_hidden_layers=2, head_dim=16, sliding_window=WINDOW, tie_word_embeddings=False)


def qwen2_window_config():
    from transformers import Qwen2Config

    # sliding from layer 1 on, as Qwen2's use_sliding_window / max_window_layers say
    return Qwen2Config(**COMMON, num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW,
                       max_window_layers=1, tie_word_embeddings=False)


CONFIGS = {"gemma3": gemma3_config, "qwen3": qwen3_config, "mistral": mistral_config, "qwen2-window": qwen2_window_config}
PROMPTS = random_prompts(5, [5, 40, 17, 70, 1], seed=11)  # three longer than the window


@pytest.fixture(scope="module", params=list(CONFIGS))
def family(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = make_model_folder(folder, CONFIGS[request.param](), seed=7)
    want = [hf_greedy(hf, p, STEPS)[0] for p in PROMPTS]
    return request.param, folder, want


@pytest.mark.parametrize("budget,caching,blocks", [(7, True, 256), (64, False, 256), (64, True, 14)],
                         ids=["chunk7-cached", "chunk64-uncached", "preempting"])
def test_greedy_equals_transformers(family, budget, caching, blocks):
    name, folder, want = family
    if blocks == 14:
        # The memory of 14 blocks across every layer (window layers hold fewer, so more fit), or of 6
        # where every layer has a window: a request holds at most 6 then, and they must compete.
        cfg = ArchConfig.from_folder(folder)
        n = 6 if cfg.layer_types and all(t == SLIDING for t in cfg.layer_types) else 14
        kv = dict(num_kv_blocks=None, kv_cache_memory=n * 16 * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4)
    else:
        n, kv = 0, dict(num_kv_blocks=blocks)
    llm = make_llm(folder, max_num_batched_tokens=budget, enable_prefix_caching=caching, **kv)
    prompts = PROMPTS + [PROMPTS[3][:48] + [9, 9]]  # shares three blocks with prompt 3
    want = want + [None]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True), use_tqdm=False)
    for i, (o, w) in enumerate(zip(outs, want)):
        if w is not None:
            assert o.outputs[0].token_ids == w, f"{name}: prompt {i} differs from transformers"
    if caching and blocks == 256:
        assert llm.engine.kv.prefix_hits > 0
    if blocks == 14 and n == 14:  # (a window-only model's running requests never grow: they wait to be admitted)
        assert llm.engine.scheduler.num_preemptions > 0


def test_layer_windows_follow_transformers_rules():
    base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=3, num_attention_heads=1)
    mistral = ArchConfig.from_dict({**base, "architectures": ["MistralForCausalLM"], "sliding_window": 16})
    assert [mistral.layer_window(i) for i in range(3)] == [16, 16, 16]
    old_qwen2 = ArchConfig.from_dict({**base, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 16,
                                      "use_sliding_window": True, "max_window_layers": 2})
    assert [old_qwen2.layer_window(i) for i in range(3)] == [None, None, 16]
    off = ArchConfig.from_dict({**base, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 16})
    assert [off.layer_window(i) for i in range(3)] == [None, None, None]
    with pytest.raises(UnsupportedArchitectureError, match="layer_types"):
        ArchConfig.from_dict({**base, "architectures": ["Gemma3ForCausalLM"], "sliding_window": 4,
                              "layer_types": [SLIDING, "chunked_attention", FULL]})
    with pytest.raises(UnsupportedArchitectureError, match="activation"):
        ArchConfig.from_dict({**base, "architectures": ["LlamaForCausalLM"], "hidden_act": "relu2"})
