"""Speculative decoding against the same engine without it, side by side in one run:

  (a) copy-heavy single stream on the embedded model (`llmserve bench`'s copy workload: a passage of
      --copy-input-len tokens, then "repeated word for word"), greedy, --output-len tokens:
      ngram prompt lookup vs none. Output tok/s (end to end), TPOT, TTFT; outputs must be identical.
  (b) self_quantized on the float32 folder of the embedded model (quantization none: the float
      weights the GGUF file dequantizes to), an ordinary chat answer, greedy: the draft in Q8_0 and
      in Q4_1 blocks vs float32 without speculation. TPOT; outputs must be identical.
  (c) W1 (64 x 256 -> 128, random prompts, temperature 1.0 as `llmserve bench throughput`): ngram
      speculation on (its load backoff at work) vs off, output tok/s.

Runs of the configurations take turns, so load that comes and goes on the machine falls on all
alike. Usage: python benchmarks/spec_decode.py [--parts a,b,c] [--runs N] [--output-len N]
"""
from __future__ import annotations

import argparse
import statistics
import time

from llmserve.entrypoints.llm import LLM
from llmserve.sampling_params import SamplingParams

NGRAM = {"method": "ngram", "num_speculative_tokens": 4}


def single_stream(llm: LLM, prompt: list[int], max_tokens: int) -> dict:
    """One greedy request alone in the engine, timed from add to finish."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    before = engine.stats()
    start = time.perf_counter()
    engine.add_request("bench", prompt, params)
    first, out = None, None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if first is None and o.outputs[0].token_ids:
                first = time.perf_counter()
            out = o
    end = time.perf_counter()
    ids = out.outputs[0].token_ids
    after = engine.stats()
    drafted = after["spec_decode_num_draft_tokens"] - before["spec_decode_num_draft_tokens"]
    accepted = after["spec_decode_num_accepted_tokens"] - before["spec_decode_num_accepted_tokens"]
    return {"ids": ids, "e2e": end - start, "ttft": first - start,
            "tpot": (end - first) / max(len(ids) - 1, 1), "tok_s": len(ids) / (end - start),
            "acceptance": accepted / drafted if drafted else None}


def compare_single(llms: dict[str, LLM], prompt: list[int], max_tokens: int, runs: int) -> None:
    for llm in llms.values():  # warm up: first-call costs stay out
        single_stream(llm, prompt[:32], 8)
    results: dict[str, list[dict]] = {name: [] for name in llms}
    for _ in range(runs):
        for name, llm in llms.items():
            results[name].append(single_stream(llm, prompt, max_tokens))
    base_name = next(iter(llms))
    base_ids = results[base_name][0]["ids"]
    base_tpot = statistics.median(r["tpot"] for r in results[base_name])
    base_tok_s = statistics.median(r["tok_s"] for r in results[base_name])
    for name, rs in results.items():
        tpot = statistics.median(r["tpot"] for r in rs)
        tok_s = statistics.median(r["tok_s"] for r in rs)
        ttft = statistics.median(r["ttft"] for r in rs)
        same = all(r["ids"] == base_ids for r in rs)
        acc = rs[0]["acceptance"]
        print(f"  {name:<22} {tok_s:7.1f} output tok/s ({tok_s / base_tok_s:4.2f}x)  TPOT {tpot * 1e3:6.2f} ms "
              f"({base_tpot / tpot:4.2f}x better)  TTFT {ttft * 1e3:6.1f} ms  "
              f"acceptance {'-' if acc is None else f'{acc:.1%}'}  outputs identical: {same}")


def part_copy(args) -> None:
    from llmserve.bench.workloads import PromptFactory

    llms = {"none": LLM(), "ngram": LLM(speculative_config=NGRAM)}
    factory = PromptFactory(llms["none"].get_tokenizer(), seed=0)
    text, _ = factory.copy_prompt(args.copy_input_len)
    prompt = llms["none"].get_tokenizer().encode(text)
    print(f"(a) copy-heavy single stream, embedded model: {len(prompt)} prompt tokens -> {args.output_len}, greedy")
    compare_single(llms, prompt, args.output_len, args.runs)


def part_self_quantized(args) -> None:
    from llmserve.model.resolve import resolve_model_folder
    from llmserve.tokenizer import apply_chat_template

    folder = str(resolve_model_folder(None))
    llms = {"float32": LLM(model=folder, quantization="none")}
    for q in ("q8_0", "q4_1"):
        llms[f"float32 + self_{q}"] = LLM(model=folder, quantization="none", speculative_config={
            "method": "self_quantized", "quantization": q, "num_speculative_tokens": 4})
    prompt = apply_chat_template(llms["float32"].get_tokenizer(), [
        {"role": "user", "content": "Explain how a bicycle works, part by part."}], True)
    print(f"(b) self_quantized on the float32 folder of the embedded model: chat prompt of {len(prompt)} "
          f"tokens -> {args.output_len}, greedy")
    compare_single(llms, prompt, args.output_len, args.runs)


def part_w1(args) -> None:
    from llmserve.bench.throughput import measure_throughput
    from llmserve.bench.workloads import PromptFactory, build_requests

    llms = {"none": LLM(), "ngram": LLM(speculative_config=NGRAM)}
    factory = PromptFactory(llms["none"].get_tokenizer(), vocab_size=llms["none"].engine.model_config.vocab_size)
    reqs = build_requests("random", 64, factory, as_ids=True, input_len=256, output_len=128)
    print("(c) W1: 64 x 256 -> 128, temperature 1.0, all at once")
    results: dict[str, list[dict]] = {name: [] for name in llms}
    for run in range(args.runs):
        for name, llm in llms.items():
            results[name].append(measure_throughput(llm, reqs, ignore_eos=True, warmup=1 if run == 0 else 0,
                                                    progress=False))
    base = statistics.median(r["output_tokens_per_second"] for r in results["none"])
    for name, rs in results.items():
        tok_s = statistics.median(r["output_tokens_per_second"] for r in rs)
        drafts = sum(r.get("spec_decode_num_drafts", 0) for r in rs)
        print(f"  {name:<22} {tok_s:7.1f} output tok/s ({tok_s / base:4.3f}x)  verify runs {drafts}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="a,b,c")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--copy-input-len", type=int, default=400)
    args = p.parse_args()
    parts = {"a": part_copy, "b": part_self_quantized, "c": part_w1}
    for name in args.parts.split(","):
        parts[name](args)


if __name__ == "__main__":
    main()
