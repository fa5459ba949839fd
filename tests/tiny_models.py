"""Tiny random models and a byte-level tokenizer, written into folders, for tests.

Everything here is small enough to build in well under a second on a CPU:
hidden 64, 2 layers, a vocabulary of 256 bytes + 2 specials + a few merges, float32.

- `byte_tokenizer()`: a byte-level BPE tokenizer. Token id b (0..255) is the single byte b, so a
  multi-byte UTF-8 character is split across tokens; a few merges make tokens that end in the
  middle of a character (e.g. "a" + the first byte of "é").
- `make_model_folder(folder, config)`: random-init a transformers model from `config`, save it
  (safetensors, optionally sharded) together with the tokenizer; returns the HF model for reference.
- `make_successor_model(folder, successor)`: a Llama whose greedy next token depends only on the
  current token (`successor[t]`), to script exact outputs (text, eos, stop strings) through the engine.
- `hf_greedy(model, prompt, n)`: transformers' `generate(do_sample=False)` with no eos, plus the
  per-step logits.
- `make_llm(folder, **kw)`: `LLM(model=folder)` on CPU in float32 with a small KV cache by default.
"""
from __future__ import annotations

from pathlib import Path

import torch

# These models are tiny: one thread is faster than two, and much faster when the machine is busy.
torch.set_num_threads(1)

BOS_ID = 256
EOS_ID = 257
SPECIAL_TOKENS = ("<s>", "</s>")

# Merges (in byte values). "a" + 0xC3 ends mid-character ("é" is C3 A9); "th", "the" and " t"
# are ordinary multi-character tokens; 0xE6 0x97 is two thirds of "日" (E6 97 A5).
DEFAULT_MERGES: list[tuple[bytes, bytes]] = [
    (b"t", b"h"), (b"th", b"e"), (b" ", b"t"), (b"a", b"\xc3"), (b"\xe6", b"\x97"), (b"o", b"o"),
]


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte <-> printable character table used by ByteLevel pre-tokenizers."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer(merges: list[tuple[bytes, bytes]] = DEFAULT_MERGES):
    """A PreTrainedTokenizerFast over bytes: ids 0..255 are bytes, 256 <s>, 257 </s>, then merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    b2u = _bytes_to_unicode()

    def enc(bs: bytes) -> str:
        return "".join(b2u[b] for b in bs)

    vocab = {enc(bytes([b])): b for b in range(256)}
    vocab[SPECIAL_TOKENS[0]] = BOS_ID
    vocab[SPECIAL_TOKENS[1]] = EOS_ID
    for left, right in merges:
        vocab[enc(left + right)] = len(vocab)
    bpe = models.BPE(vocab=vocab, merges=[(enc(a), enc(b)) for a, b in merges])
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL_TOKENS[0], eos_token=SPECIAL_TOKENS[1])


VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + len(DEFAULT_MERGES)


def llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
              bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=False, initializer_range=0.2)
    kw.update(overrides)
    return LlamaConfig(**kw)


def qwen2_config(**overrides):
    from transformers import Qwen2Config

    kw = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
              bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=False, initializer_range=0.2,
              use_sliding_window=False)
    kw.update(overrides)
    return Qwen2Config(**kw)


def _init_model(config):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _randomize_small_params(model, seed: int) -> None:
    """HF initializes norm weights to 1 and biases to 0; perturb them so a loader that skips or
    swaps them cannot pass by accident."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def make_model_folder(folder: str | Path, config, *, seed: int = 0, max_shard_size: str | None = None,
                      tokenizer=None):
    """Random-init a model from `config` into `folder` (safetensors + tokenizer). Returns the HF model."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = _init_model(config)
    _randomize_small_params(model, seed)
    model.eval()
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **kw)
    (tokenizer or byte_tokenizer()).save_pretrained(folder)
    return model


def make_successor_model(folder: str | Path, successor: dict[int, int], *, seed: int = 0, **config_overrides):
    """A Llama whose greedy next token is `successor[current token]` for every token in the map,
    whatever came before: attention and MLP outputs are zero, so the last hidden state is the
    normed embedding of the current token, and the LM head row of token j is the sum of the
    embeddings of the tokens whose successor j is. Tokens outside the map go wherever their random
    logits say. Returns the HF model."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = llama_config(**config_overrides)
    torch.manual_seed(seed)
    model = _init_model(config)
    v, h = config.vocab_size, config.hidden_size
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(v, h, generator=g)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    head = 0.05 * torch.randn(v, h, generator=g)
    for t, nxt in successor.items():
        head[nxt] += emb[t]
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(emb)
        model.get_output_embeddings().weight.copy_(head * 4.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    model.eval()
    # The map must hold under HF's own forward, with a clear margin.
    with torch.no_grad():
        keys = sorted(successor)
        logits = model(torch.tensor(keys)[:, None]).logits[:, -1]
    top2 = logits.topk(2, dim=-1)
    assert top2.indices[:, 0].tolist() == [successor[t] for t in keys], "successor model does not realize its map"
    assert bool((top2.values[:, 0] - top2.values[:, 1] > 1.0).all()), "successor model margin too small"
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return model


def successor_chain(token_ids: list[int], then: int | None = None) -> dict[int, int]:
    """Map each token of `token_ids` to the next one (the tokens must be distinct); the last one
    maps to `then` if given."""
    assert len(set(token_ids)) == len(token_ids), "chain tokens must be distinct"
    succ = dict(zip(token_ids, token_ids[1:]))
    if then is not None:
        succ[token_ids[-1]] = then
    return succ


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy generate with no eos: (new token ids, logits [max_new_tokens, V])."""
    saved_eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None  # else generate() would stop at it
    try:
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True)
    finally:
        model.generation_config.eos_token_id = saved_eos
    ids = out.sequences[0, len(prompt):].tolist()
    logits = torch.stack([x[0] for x in out.logits]).float()
    assert len(ids) == max_new_tokens
    return ids, logits


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), V] of one full forward pass."""
    return model(torch.tensor([ids])).logits[0].float()


def make_llm(folder: str | Path, **kwargs):
    """LLM(model=folder) on CPU in float32; a small KV cache unless num_kv_blocks is given."""
    from llmserve.entrypoints.llm import LLM

    kw = dict(device="cpu", dtype="float32", num_kv_blocks=256, block_size=16)
    kw.update(kwargs)
    return LLM(model=str(folder), **kw)


def random_prompts(n: int, lengths: list[int] | None = None, *, seed: int = 0, vocab: int = 256) -> list[list[int]]:
    """n prompts of byte tokens with the given (or varied) lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [1 + (7 * i + 3) % 40 for i in range(n)]
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for length in lengths[:n]]


def make_published_gguf_model(folder: str | Path):
    """A tiny tied Llama whose weights are exactly what a GGUF file publishes: every projection
    rounded through Q4_1 and the embedding (the tied head) through Q8_0, as SmolLM2's GGUF stores
    them. Returns the transformers model."""
    from llmserve.model.gguf_quant import dequantize, quantize

    hf = make_model_folder(folder, llama_config(tie_word_embeddings=True))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("proj.weight"):
                p.copy_(dequantize(quantize(p, "q4_1"), "q4_1", p.shape[1]))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(dequantize(quantize(p, "q8_0"), "q8_0", p.shape[1]))
    hf.save_pretrained(folder)
    return hf


def greedy(max_tokens: int = 16, **kw):
    """Greedy sampling of exactly max_tokens tokens (EOS ignored)."""
    from llmserve.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def run_to_idle(engine) -> dict:
    """Step until no request is left; each request's last output, by request id."""
    last = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            last[out.request_id] = out
    return last


def move_mid_generation(src, dst, request_id: str, after_tokens: int, *, with_kv: bool) -> dict:
    """Step `src` until every sequence of the request has `after_tokens` outputs, export it (through
    pickle, as it crosses processes) and import it into `dst`; returns the exported state."""
    import pickle

    while min(s.num_output_tokens for s in src.groups[request_id].seqs) < after_tokens:
        src.step()
    state = pickle.loads(pickle.dumps(src.export_request(request_id, with_kv=with_kv)))
    dst.import_request(state)
    return state


def tokens_before_first_difference(a, b) -> int:
    """Summed over request pairs (RequestOutputs of the same prompts): how many generated tokens
    agree before the first difference."""
    agreed = 0
    for x, y in zip(a, b):
        tx, ty = x.outputs[0].token_ids, y.outputs[0].token_ids
        agreed += next((i for i, (u, v) in enumerate(zip(tx, ty)) if u != v), len(tx))
    return agreed
