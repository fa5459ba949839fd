"""IncrementalDetokenizer over a byte-level tokenizer whose tokens split multi-byte characters."""
from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmserve.engine.detokenizer import IncrementalDetokenizer
from tiny_models import EOS_ID, byte_tokenizer

REPLACEMENT = "\ufffd"
# ASCII, 2-, 3- and 4-byte characters, and the pieces the test tokenizer merges ("the", "aé", "日").
ALPHABET = st.sampled_from(list("abcdeht _xé日本€í😀") + ["the", "aé", "aí", "日本"])
TEXTS = st.lists(ALPHABET, max_size=24).map("".join)


@functools.lru_cache(maxsize=1)
def tok():
    return byte_tokenizer()


def encode(text: str) -> list[int]:
    return tok().encode(text, add_special_tokens=False)


def feed(ids: list[int], prompt: str = "Q: ", stop: list[str] | None = None, include: bool = False):
    """Feed ids one at a time; returns (detokenizer, visible text after each token, stop index)."""
    d = IncrementalDetokenizer(tok(), encode(prompt)[-8:], stop or [], include)
    visible, stopped_at = [], None
    for i, t in enumerate(ids):
        if d.add(t):
            stopped_at = i
            break
        visible.append(d.visible_text(False))
    return d, visible, stopped_at


def test_tokens_really_split_characters():
    ids = encode("aé日😀")
    assert len(ids) > 4
    assert sum(REPLACEMENT in tok().decode([t]) for t in ids) >= 3


@settings(max_examples=200, deadline=None)
@given(text=TEXTS, prompt=st.sampled_from(["", "x", "Q: ", "日本", "aé"]))
def test_text_equals_decode_and_never_splits_a_character(text, prompt):
    ids = encode(text)
    d, visible, stopped = feed(ids, prompt or "x")
    assert stopped is None
    assert d.visible_text(True) == tok().decode(ids) == text
    prev = ""
    for v in visible:
        assert REPLACEMENT not in v  # no half character, ever
        assert v.startswith(prev)  # text only grows
        prev = v


@settings(max_examples=300, deadline=None)
@given(text=TEXTS, stop=st.lists(ALPHABET, min_size=1, max_size=3).map("".join), include=st.booleans())
def test_stop_string(text, stop, include):
    ids = encode(text)
    d, visible, stopped = feed(ids, stop=[stop], include=include)
    final = d.visible_text(True)
    if stop in text:
        cut = text.index(stop)
        assert stopped is not None and d.stop_string == stop
        assert final == (text[:cut + len(stop)] if include else text[:cut])
    else:
        assert stopped is None and d.stop_string is None
        assert final == text
    # What was shown while running is never taken back, and holds no part of a stop string.
    for v in visible:
        assert final.startswith(v)
        assert REPLACEMENT not in v
        assert stop not in v


def test_stop_string_is_held_back_while_it_may_match():
    d, visible, _ = feed(encode("hello wor"), stop=["world"])
    assert d.visible_text(False) == "hello "
    assert d.visible_text(True) == "hello wor"  # finished for another reason: all of it
    assert not d.add(encode("k")[0])
    assert d.visible_text(False) == "hello work"
    # Two stop strings: the text is held for the longer possible match.
    d, _, _ = feed(encode("abc"), stop=["cd", "bcx"])
    assert d.visible_text(False) == "a"


def test_stop_string_inside_one_token_and_the_earliest_wins():
    # "the" is one token; the stop string "he" lies inside it.
    d, _, stopped = feed(encode("xx the y"), stop=["he"])
    assert stopped is not None and d.visible_text(True) == "xx t"
    # Both complete with the same token: the one that starts first wins.
    d, _, _ = feed(encode("_the"), stop=["he", "th"])
    assert d.text == "_" and d.stop_string == "th"


def test_multibyte_stop_string_across_tokens():
    ids = encode("xé日本y")
    d, visible, stopped = feed(ids, stop=["日本"])
    assert stopped == len(encode("xé日本")) - 1
    assert d.visible_text(True) == "xé"
    assert all(REPLACEMENT not in v for v in visible)
    d, _, _ = feed(ids, stop=["日本"], include=True)
    assert d.text == "xé日本"


def test_special_tokens_are_skipped():
    ids = encode("ab") + [EOS_ID] + encode("é")
    d, visible, _ = feed(ids)
    assert d.visible_text(True) == "abé"
    d = IncrementalDetokenizer(tok(), [], [], skip_special_tokens=False)
    for t in ids:
        d.add(t)
    assert d.text == "ab</s>é"


def test_check_stop_false_does_not_cut():
    d = IncrementalDetokenizer(tok(), encode("Q"), ["cd"])
    for t in encode("abcd"):
        assert not d.add(t, check_stop=False)
    assert d.text == "abcd" and d.stop_string is None
    assert d.add(encode("c")[0]) is False
    assert d.add(encode("d")[0]) is True
    assert d.text == "abcd"


@pytest.mark.parametrize("prompt", ["", "x"])
def test_prompt_tail_gives_context(prompt):
    # Output starting with a continuation of the prompt's last word decodes on its own.
    d = IncrementalDetokenizer(tok(), encode(prompt), [])
    for t in encode("the 日本"):
        d.add(t)
    assert d.text == "the 日本"
