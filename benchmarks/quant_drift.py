"""Logprob drift of each weight storage mode (and of 8-bit activations, and of narrower KV caches)
against float32 on a fixed prompt set.

For each mode, the same token sequences (each prompt followed by float32's greedy continuation)
are scored with prompt_logprobs; the drift is the difference of the logprobs the modes give those
tokens. Also reports how many greedy continuations stay identical to float32's.

    .venv/bin/python benchmarks/quant_drift.py [--model PATH] [--tokens 32] [--modes float32,fp8 kv,...]
"""
from __future__ import annotations

import argparse
import statistics

from llmserve import LLM, SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three prime numbers greater than 100.",
    "Translate 'good morning' into Spanish and German.",
    "Why is the sky blue?",
    "Give me a Python function that reverses a string.",
    "Summarize the plot of Romeo and Juliet in one sentence.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--modes", default=None, help="comma-separated mode names (default: all; float32 always first)")
    args = ap.parse_args()

    # "auto" keeps the published GGUF blocks (Q4_1/Q8_0 for SmolLM2): the same weights as float32.
    # "q8 act" keeps them too, and quantizes the activations of those layers to 8 bits (--activations q8).
    modes = {"float32": dict(quantization="none"), "auto": dict(quantization="auto"),
             "q8 act": dict(quantization="auto", activations="q8"), "bf16": dict(quantization="bf16"),
             "int8": dict(quantization="int8"), "q8_0": dict(quantization="q8_0"), "q4_1": dict(quantization="q4_1"),
             # The KV cache narrower than float32 (--kv-cache-dtype), over the published blocks.
             "f16 kv": dict(quantization="auto", kv_cache_dtype="float16"),
             "fp8 kv": dict(quantization="auto", kv_cache_dtype="fp8_e4m3"),
             "e5m2 kv": dict(quantization="auto", kv_cache_dtype="fp8_e5m2"),
             "q8+fp8": dict(quantization="auto", activations="q8", kv_cache_dtype="fp8_e4m3")}
    if args.modes:
        wanted = ["float32"] + [m.strip() for m in args.modes.split(",") if m.strip() != "float32"]
        unknown = [m for m in wanted if m not in modes]
        if unknown:
            raise SystemExit(f"unknown modes {unknown}; known: {list(modes)}")
        modes = {m: modes[m] for m in wanted}
    greedy = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    score = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    reference: list[list[int]] = []
    ref_lps: list[list[float]] = []
    print(f"{'mode':8} {'same greedy':>12} {'mean |dlogprob|':>16} {'max |dlogprob|':>15}")
    for name, kwargs in modes.items():
        llm = LLM(args.model, dtype="float32", **kwargs)
        convs = [[{"role": "user", "content": p}] for p in PROMPTS]
        outs = llm.chat(convs, greedy, use_tqdm=False)
        prompts = [o.prompt_token_ids for o in outs]
        if not reference:
            reference = [p + o.outputs[0].token_ids for p, o in zip(prompts, outs)]
        scored = llm.generate(reference, score, use_tqdm=False)
        lps = []
        for seq, out in zip(reference, scored):
            lps.append([next(iter(pos.values()))[0] if pos else 0.0 for pos in out.prompt_logprobs[1:]]
                       if out.prompt_logprobs else [])
        if not ref_lps:
            ref_lps = lps
        drift = [abs(a - b) for la, lb, p in zip(lps, ref_lps, prompts)
                 for a, b in zip(la[len(p) - 1:], lb[len(p) - 1:])]
        same = sum(p + o.outputs[0].token_ids == r for p, o, r in zip(prompts, outs, reference))
        print(f"{name:8} {same:>9}/{len(PROMPTS)} {statistics.mean(drift):>16.4f} {max(drift):>15.4f}")
        del llm


if __name__ == "__main__":
    main()
