"""Workload generators for the benchmarks: request lengths and the prompts that carry them.

A workload is a list of `BenchRequest`s: a prompt (text, or token ids) and the number of tokens to
generate. Lengths come from one of
  - `random`: a fixed input/output length, or uniform within +-range_ratio of it;
  - `chat`, `code`, `summarization`: log-normal fits of ln(tokens) from public traces (DESIGN.md,
    "Reference points"), truncated to a maximum length;
  - `shared-prefix`: a few long shared prefixes, each request adding its own suffix;
  - `copy`: copy-heavy, the shape speculative decoding (n-gram prompt lookup) is for: the prompt
    holds a passage of input_len tokens and asks for it again word for word, so most of the answer
    repeats the prompt (as "rewrite this with one change" or quoting summaries do);
  - `file`: a JSONL file, one request a line.

Prompts are random: random token ids for an engine we drive directly, or random common English
words for a server (any server can tokenize them; one word is about one token for BPE vocabularies,
and with a tokenizer at hand the text is trimmed or padded to the exact count).
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# (mu, sigma) of ln(tokens): prompt, output.
SHAPES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "chat": ((6.63, 0.99), (5.02, 0.86)),  # Azure LLM inference trace, conversation
    "code": ((7.00, 1.36), (2.79, 0.85)),  # Azure LLM inference trace, code
    "summarization": ((7.72, 0.75), (5.19, 0.80)),  # arXiv summarization (skewed to the cap)
}
WORKLOADS = ("random", *SHAPES, "shared-prefix", "copy", "file")
COPY_INSTRUCTION = "\n\nThe text above, repeated word for word:\n"

# Common short English words; with a leading space each is one token in GPT-2-style BPE vocabularies.
WORDS = (  # noqa: SIM905 - a word list reads better as text
    "the of and to in is was that for on as with by he at from his an were are which this be or "
    "had not but first one their its new after who they have her she two been other when there all "
    "during into school time may years more most only over city some world would where later up such "
    "used many can state about national out known university united then made also group under "
    "three people year well could part while him than both through second film between these high "
    "you we team game season work should like before just under back life name main four music "
    "long series same home band country book early day five each three off end won own since north "
    "south east west area large small old young local public great since best left right family war "
    "water number line power order point road court land church place town story house way army "
    "party field side player form development system club use several around until however each "
    "because them any much even still often very did will released took took same members including "
    "called based held american british french german english great last next under top took river "
    "following general being another show report along station history among without age down "
    "government however within set began total three law air final major built times open free "
    "children began last different per play good say make take see come think look want give tell "
    "work call try ask need feel become leave put mean keep let begin seem help talk turn start show "
    "hear run move live believe bring happen write provide sit stand lose pay meet include continue "
    "learn change lead understand watch follow stop create speak read allow add spend grow offer "
    "remember love consider appear buy wait serve die send expect build stay fall cut reach kill "
    "remain suggest raise pass sell require decide return explain hope develop carry break receive "
    "agree support hit produce eat cover catch draw choose cause point listen realize place close "
    "open red blue green black white light dark hot cold warm fast slow hard soft easy simple clear "
    "full empty rich poor short tall deep wide strong weak true false real sure ready able happy"
).split()
WORDS = tuple(dict.fromkeys(WORDS))  # unique, order kept


@dataclass
class BenchRequest:
    prompt: str | list[int]
    prompt_len: int  # tokens, exact for token ids and for text sized with a tokenizer, else estimated
    output_len: int

    def __repr__(self) -> str:  # benchmark prompts are random, but keep the habit: no content in reprs
        kind = "ids" if isinstance(self.prompt, list) else "text"
        return f"BenchRequest({kind}, prompt_len={self.prompt_len}, output_len={self.output_len})"


# ---- lengths ---------------------------------------------------------------------------------
def uniform_lengths(rng: np.random.Generator, n: int, length: int, range_ratio: float) -> list[int]:
    """`length` exactly, or uniform integers in [length*(1-r), length*(1+r)], at least 1."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError("range ratio must be in [0, 1)")
    if range_ratio == 0.0:
        return [max(1, int(length))] * n
    lo = max(1, math.floor(length * (1 - range_ratio)))
    hi = max(lo, math.ceil(length * (1 + range_ratio)))
    return [int(x) for x in rng.integers(lo, hi + 1, size=n)]


def lognormal_lengths(rng: np.random.Generator, n: int, mu: float, sigma: float, cap: int) -> list[int]:
    """round(exp(N(mu, sigma))), clipped to [1, cap]: the shape of a trace truncated at a context cap."""
    raw = np.exp(rng.normal(mu, sigma, size=n))
    return [int(x) for x in np.clip(np.rint(raw), 1, cap)]


def sample_lengths(workload: str, n: int, *, seed: int = 0, input_len: int = 256, output_len: int = 128,
                   range_ratio: float = 0.0, max_input_len: int = 2048,
                   max_output_len: int = 1024) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) for n requests of a synthetic workload."""
    rng = np.random.default_rng(seed)
    if workload in SHAPES:
        (pmu, psig), (omu, osig) = SHAPES[workload]
        ins = lognormal_lengths(rng, n, pmu, psig, max_input_len)
        outs = lognormal_lengths(rng, n, omu, osig, max_output_len)
    elif workload in ("random", "shared-prefix", "copy"):
        ins = uniform_lengths(rng, n, input_len, range_ratio)
        outs = uniform_lengths(rng, n, output_len, range_ratio)
    else:
        raise ValueError(f"no synthetic lengths for workload {workload!r}")
    return list(zip(ins, outs))


def arrival_offsets(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> list[float]:
    """Send times (s from the start) of n requests: a gamma renewal process of mean rate `rate`.

    Inter-arrival gaps are Gamma(shape=burstiness, scale=1/(rate*burstiness)): exponential (Poisson
    arrivals) at burstiness 1, burstier below 1, more regular above. The first request goes at 0.
    """
    if n <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    if not burstiness > 0:
        raise ValueError("burstiness must be positive")
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return [0.0] + [float(x) for x in np.cumsum(gaps)]


# ---- prompts ---------------------------------------------------------------------------------
class PromptFactory:
    """Random prompts of a given size in tokens, as token ids or as text.

    With a tokenizer: ids avoid special tokens, and text is checked against the tokenizer and trimmed
    or padded to the exact count. Without one, ids need `vocab_size` and text is one word per token.
    """

    def __init__(self, tokenizer=None, *, vocab_size: int | None = None, seed: int | Sequence[int] = 0) -> None:
        self.tokenizer = tokenizer
        self.rng = np.random.default_rng(seed)
        if tokenizer is not None:
            special = set(getattr(tokenizer, "all_special_ids", []) or [])
            size = len(tokenizer) if vocab_size is None else min(len(tokenizer), vocab_size)
            self.id_pool = np.array([i for i in range(size) if i not in special], dtype=np.int64)
        elif vocab_size is not None:
            self.id_pool = np.arange(vocab_size, dtype=np.int64)
        else:
            self.id_pool = None

    def ids(self, n: int) -> list[int]:
        if self.id_pool is None:
            raise ValueError("token-id prompts need a tokenizer or a vocabulary size")
        return [int(x) for x in self.rng.choice(self.id_pool, size=n)]

    def _words(self, n: int) -> str:
        picks = self.rng.integers(0, len(WORDS), size=n)
        return " ".join(WORDS[i] for i in picks)

    def count(self, text: str) -> int:
        """Tokens in `text`: exact with a tokenizer, else one a word."""
        if self.tokenizer is None:
            return len(text.split())
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def copy_prompt(self, n: int) -> tuple[str, int]:
        """A passage of about n tokens, then the request to repeat it and its first words (so a
        model starts the copy at once)."""
        passage, _ = self.text(n)
        text = passage + COPY_INSTRUCTION + " ".join(passage.split()[:3])
        return text, self.count(text)

    def text(self, n: int) -> tuple[str, int]:
        """A text of about n tokens and its token count."""
        text = self._words(n)
        if self.tokenizer is None:
            return text, n
        for _ in range(4):
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) > n:
                text = self.tokenizer.decode(ids[:n])
            elif len(ids) < n:
                text = text + " " + self._words(n - len(ids))
            else:
                return text, n
        return text, self.count(text)


def build_requests(workload: str, n: int, factory: PromptFactory, *, as_ids: bool, seed: int = 0,
                   input_len: int = 256, output_len: int = 128, range_ratio: float = 0.0,
                   max_input_len: int = 2048, max_output_len: int = 1024, prefix_len: int = 512,
                   num_prefixes: int = 4, workload_file: str | Path | None = None,
                   max_total_len: int | None = None) -> list[BenchRequest]:
    """A workload of n requests. `max_total_len` (the model's context) caps prompt + output."""
    if workload == "file":
        if workload_file is None:
            raise ValueError("workload 'file' needs a workload file")
        reqs = load_workload_file(workload_file, factory, as_ids=as_ids)
        if n:
            reqs = reqs[:n]
        return [_fit(r, max_total_len, factory) for r in reqs]
    lengths = sample_lengths(workload, n, seed=seed, input_len=input_len, output_len=output_len,
                             range_ratio=range_ratio, max_input_len=max_input_len, max_output_len=max_output_len)
    prefixes: list = []
    if workload == "shared-prefix":
        if num_prefixes < 1 or prefix_len < 1:
            raise ValueError("shared-prefix needs at least one prefix of at least one token")
        prefixes = [factory.ids(prefix_len) if as_ids else factory.text(prefix_len) for _ in range(num_prefixes)]
    pre = 0
    if prefixes:
        pre = prefix_len if as_ids else max(c for _, c in prefixes)
    reqs = []
    for i, (plen, olen) in enumerate(lengths):
        if max_total_len is not None:
            plen = max(1, min(plen, max_total_len - 1 - pre))
            olen = max(1, min(olen, max_total_len - pre - plen))
        if workload == "copy":
            prompt, count = factory.copy_prompt(plen)
            if as_ids:
                if factory.tokenizer is None:
                    raise ValueError("the copy workload as token ids needs a tokenizer")
                prompt = factory.tokenizer.encode(prompt)
                count = len(prompt)
        elif as_ids:
            prompt = factory.ids(plen)
            count = plen
            if prefixes:
                prompt = prefixes[i % len(prefixes)] + prompt
                count += prefix_len
        else:
            prompt, count = factory.text(plen)
            if prefixes:
                ptext, pcount = prefixes[i % len(prefixes)]
                prompt, count = ptext + " " + prompt, pcount + count
        reqs.append(BenchRequest(prompt, count, olen))
    return reqs


def _fit(r: BenchRequest, max_total_len: int | None, factory: PromptFactory) -> BenchRequest:
    if max_total_len is None or r.prompt_len + r.output_len <= max_total_len:
        return r
    if r.prompt_len >= max_total_len:
        if isinstance(r.prompt, list):
            r = BenchRequest(r.prompt[: max_total_len - 1], max_total_len - 1, r.output_len)
        else:
            raise ValueError(f"a workload prompt of {r.prompt_len} tokens does not fit a context of {max_total_len}")
    return BenchRequest(r.prompt, r.prompt_len, max(1, min(r.output_len, max_total_len - r.prompt_len)))


# ---- workload files --------------------------------------------------------------------------
def load_workload_file(path: str | Path, factory: PromptFactory | None = None, *,
                       as_ids: bool = False) -> list[BenchRequest]:
    """JSONL, one request a line: {"prompt": "..."} or {"prompt_token_ids": [...]}, and
    {"output_len": N} (or "max_tokens"). A text prompt is tokenized when ids are wanted."""
    reqs = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{lineno}: not a JSON object") from None
        out = row.get("output_len", row.get("max_tokens"))
        if not isinstance(out, int) or out < 1:
            raise ValueError(f"{path}:{lineno}: needs a positive integer output_len")
        if "prompt_token_ids" in row:
            ids = row["prompt_token_ids"]
            if not ids or not all(isinstance(t, int) for t in ids):
                raise ValueError(f"{path}:{lineno}: prompt_token_ids must be a non-empty list of integers")
            if as_ids:
                reqs.append(BenchRequest(list(ids), len(ids), out))
            else:
                tok = factory.tokenizer if factory is not None else None
                if tok is None:
                    raise ValueError(f"{path}:{lineno}: token-id prompts sent as text need a tokenizer")
                reqs.append(BenchRequest(tok.decode(ids), len(ids), out))
        elif isinstance(row.get("prompt"), str):
            text = row["prompt"]
            if as_ids:
                tok = factory.tokenizer if factory is not None else None
                if tok is None:
                    raise ValueError(f"{path}:{lineno}: text prompts sent as ids need a tokenizer")
                ids = tok.encode(text)
                reqs.append(BenchRequest(ids, len(ids), out))
            else:
                count = row.get("prompt_len") or (factory.count(text) if factory else len(text.split()))
                reqs.append(BenchRequest(text, int(count), out))
        else:
            raise ValueError(f"{path}:{lineno}: needs 'prompt' (text) or 'prompt_token_ids'")
    if not reqs:
        raise ValueError(f"{path}: no requests")
    return reqs


def write_workload_file(path: str | Path, reqs: Sequence[BenchRequest]) -> None:
    with open(path, "w") as f:
        for r in reqs:
            key = "prompt_token_ids" if isinstance(r.prompt, list) else "prompt"
            f.write(json.dumps({key: r.prompt, "prompt_len": r.prompt_len, "output_len": r.output_len}) + "\n")


def workload_summary(reqs: Sequence[BenchRequest]) -> dict:
    ins = np.array([r.prompt_len for r in reqs])
    outs = np.array([r.output_len for r in reqs])
    return {"num_requests": len(reqs),
            "prompt_len_mean": float(ins.mean()), "prompt_len_median": float(np.median(ins)),
            "prompt_len_max": int(ins.max()),
            "output_len_mean": float(outs.mean()), "output_len_median": float(np.median(outs)),
            "output_len_max": int(outs.max())}
