"""Tokenizers come from transformers/tokenizers; this module only loads them and applies templates."""
from __future__ import annotations

import copy
import json
from pathlib import Path

from llmserve.errors import InvalidRequestError, ModelLoadError


def load_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a tokenizer from {folder} ({e.__class__.__name__})") from None


def clone_tokenizer(tokenizer):
    """An independent copy (its own Rust tokenizer, same vocabulary, template and settings), for a
    second thread: an HF fast tokenizer used by two threads at once can fail ("Already borrowed")
    or mix up its truncation and padding state."""
    return copy.deepcopy(tokenizer)


def eos_token_ids(folder: str | Path, tokenizer, config_eos: tuple[int, ...]) -> tuple[int, ...]:
    """EOS ids as transformers' generate() would use them: generation_config.json first."""
    path = Path(folder) / "generation_config.json"
    if path.exists():
        eos = json.loads(path.read_text()).get("eos_token_id")
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (eos,)
    if config_eos:
        return config_eos
    return () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model has no chat template; use completions instead")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
    except Exception as e:  # jinja errors: the template rejected the conversation's shape
        raise InvalidRequestError(f"the chat template rejected the messages ({e.__class__.__name__})") from None
    # The template writes any BOS itself, so no special tokens are added on top.
    return tokenizer.encode(text, add_special_tokens=False)
