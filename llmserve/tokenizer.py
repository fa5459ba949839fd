"""Tokenizers come from transformers/tokenizers; this module only loads them and applies templates."""
from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path
from typing import Any

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


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True, *,
                        split_special_tokens: bool = True, tools: list[dict] | None = None, **kwargs) -> list[int]:
    """Render the conversation with the model's template and tokenize it.

    split_special_tokens (the default): special-token text inside the messages (and tools), such as
    "<|im_end|>" typed into a message, is tokenized as plain text, so only the template itself
    writes control tokens and a message cannot forge a turn. False parses such text as the control
    tokens it spells (the old behaviour)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model has no chat template; use completions instead")
    if tools is not None:
        if not template_supports_tools(tokenizer):  # never drop the tools silently
            raise InvalidRequestError("this model's chat template does not support tools")
        kwargs["tools"] = tools
    specials = _special_strings(tokenizer) if split_special_tokens else ()
    marked_messages, marked_tools = _mark_specials(messages, specials), _mark_specials(tools, specials)
    if marked_messages is not None:
        messages = marked_messages
    if marked_tools is not None:
        kwargs["tools"] = marked_tools
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
    except Exception as e:  # jinja errors: the template rejected the conversation's shape
        raise InvalidRequestError(f"the chat template rejected the messages ({e.__class__.__name__})") from None
    # The template writes any BOS itself, so no special tokens are added on top.
    if marked_messages is None and marked_tools is None:
        return tokenizer.encode(text, add_special_tokens=False)
    return _encode_marked(tokenizer, text, specials)


def template_supports_tools(tokenizer) -> bool:
    """Whether the chat template reads a `tools` variable (so it can show the model its tools)."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return False
    return _template_reads(template, "tools")


@functools.lru_cache(maxsize=8)
def _template_reads(template: str, name: str) -> bool:
    import jinja2
    from jinja2 import meta

    try:
        return name in meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateError:
        return re.search(rf"\b{name}\b", template) is not None


# Special-token text inside messages is swapped for a private-use marker before rendering, then
# tokenized as text, while the template's own special tokens stay control tokens.
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"


def _special_strings(tokenizer) -> tuple[str, ...]:
    names = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        if getattr(tok, "special", False):
            names.add(str(tok))
    return tuple(sorted((n for n in names if n), key=len, reverse=True))


def _mark_specials(value: Any, specials: tuple[str, ...]) -> Any:
    """A copy of value with special-token text in its strings marked; None when it has none."""
    if not specials or value is None:
        return None
    found = False

    def walk(v: Any) -> Any:
        nonlocal found
        if isinstance(v, str):
            for i, sp in enumerate(specials):
                if sp in v:
                    found = True
                    v = v.replace(sp, f"{_MARK_OPEN}{i}{_MARK_CLOSE}")
            return v
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        return v

    out = walk(value)
    return out if found else None


def _encode_marked(tokenizer, text: str, specials: tuple[str, ...]) -> list[int]:
    """Tokenize text whose control tokens come only from the template: split at the special tokens
    (as the tokenizer itself does), each one an id, and each piece between them encoded with the
    marked special text restored and split as plain text."""
    pattern = re.compile("|".join(re.escape(s) for s in specials))
    marker = re.compile(f"{_MARK_OPEN}(\\d+){_MARK_CLOSE}")
    ids: list[int] = []
    pos = 0
    for m in list(pattern.finditer(text)) + [None]:
        piece = text[pos:m.start() if m is not None else len(text)]
        if piece:
            piece = marker.sub(lambda x: specials[int(x.group(1))], piece)
            ids += tokenizer.encode(piece, add_special_tokens=False, split_special_tokens=True)
        if m is None:
            break
        ids.append(tokenizer.convert_tokens_to_ids(m.group(0)))
        pos = m.end()
    return ids
