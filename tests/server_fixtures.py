"""Shared helpers for the server tests: a tiny random Llama with a chat template, and a server
running in a background thread on a free port. Named `server_fixtures` (not conftest) so it
clashes with no other test author's fixtures."""
from __future__ import annotations

import atexit
import functools
import json
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "A serving engine batches requests and streams tokens back to its clients.",
    "Once upon a time there was a small model that wrote random words.",
    "What is the capital of France? It is Paris. Hello world, how are you today?",
] * 20


def make_tiny_model(folder: Path, vocab_size: int = 384, max_position_embeddings: int = 512) -> Path:
    """A random 2-layer Llama and a byte-level BPE tokenizer with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)

    _write_random_llama(folder, tok.get_vocab_size(), max_position_embeddings, fast.bos_token_id, fast.eos_token_id)
    return folder


def _write_random_llama(folder: Path, vocab: int, max_pos: int, bos: int, eos: int, hidden: int = 64,
                        inter: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2) -> None:
    """HF-named random weights written directly: importing transformers' Llama costs seconds."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    head_dim = hidden // heads

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.1

    tensors = {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": torch.ones(hidden),
               "lm_head.weight": rand(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": rand(inter, hidden),
            p + "mlp.up_proj.weight": rand(inter, hidden),
            p + "mlp.down_proj.weight": rand(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
        }
    save_file(tensors, str(folder / "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "max_position_embeddings": max_pos,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "bos_token_id": bos,
              "eos_token_id": eos, "tie_word_embeddings": False, "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config))


@functools.lru_cache(maxsize=1)
def tiny_model_path() -> Path:
    """Built once per test process (both server test modules share it), removed at exit."""
    folder = Path(tempfile.mkdtemp(prefix="llmserve-tiny-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return make_tiny_model(folder / "tiny")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    """A uvicorn server on its own thread, serving an app built around `engine`."""
    engine: object  # AsyncLLMEngine
    server: object  # uvicorn.Server
    thread: threading.Thread
    port: int
    api_key: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.shutdown()


def start_server(model_dir: Path | None, *, api_key: str | None = None, served_model_name: str = "tiny",
                 log_level: str = "warning", **engine_kwargs) -> RunningServer:
    import uvicorn

    from llmserve.config import EngineConfig
    from llmserve.engine.async_engine import AsyncLLMEngine
    from llmserve.server.app import ServerSettings, build_app

    engine = AsyncLLMEngine.from_config(EngineConfig(model=str(model_dir) if model_dir else None, **engine_kwargs))
    settings = ServerSettings(served_model_names=[served_model_name], api_key=api_key)
    port = free_port()
    config = uvicorn.Config(build_app(engine, settings), host="127.0.0.1", port=port, log_level=log_level,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            engine.shutdown()
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    return RunningServer(engine, server, thread, port, api_key)


def start_private_server(config, options=None, log_level: str = "warning"):
    """A private node (privacy/threats.py's config, server/private.py's routes) on a free port, in
    a thread. Returns (base_url, engine, node, app, stop)."""
    import uvicorn

    from llmserve.engine.async_engine import AsyncLLMEngine
    from llmserve.privacy.hardening import Hardening
    from llmserve.server.app import ServerSettings, build_app
    from llmserve.server.private import PrivacyOptions, PrivateNode, install

    engine = AsyncLLMEngine.from_config(config)
    app = build_app(engine, ServerSettings(served_model_names=["tiny"], private=True))
    node = PrivateNode(config, Hardening(), options or PrivacyOptions(), Path(config.model))
    install(app, node)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level, access_log=False))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=30)
        engine.shutdown()
    return f"http://127.0.0.1:{port}", engine, node, app, stop


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
