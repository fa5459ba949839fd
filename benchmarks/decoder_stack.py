"""The decoder stack (the layers in one C++ call) against the Python layers, one stream, same run.

W2's shape on the embedded model: one request at a time, random prompt tokens -> greedy output
tokens, TPOT over the decode steps (a loop of engine.step(), as benchmarks/ab_commits.py's W2). The
two paths alternate request by request on the same engine (model.use_decoder_stack), so a load that
comes and goes on the machine falls on both alike; both give the same tokens bit for bit (tests).

    LLMSERVE_NUM_THREADS=2 .venv/bin/python benchmarks/decoder_stack.py [--activations q8] [--rounds 4]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from llmserve import LLM, SamplingParams


def tpot_ms(engine, prompt_len: int, output_len: int, rng: random.Random) -> float:
    ids = [rng.randrange(1000, 20000) for _ in range(prompt_len)]
    engine.add_request(f"stack-{time.perf_counter_ns()}", ids,
                       SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True))
    engine.step()  # the prompt
    start, steps = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--activations", default="float32", choices=["float32", "q8"])
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    args = ap.parse_args()
    llm = LLM(activations=args.activations, kv_cache_dtype=args.kv_cache_dtype)
    engine, model = llm.engine, llm.engine.runner.model
    rng = random.Random(0)
    for stack in (True, False):  # warm-up (and the stack's build)
        model.use_decoder_stack = stack
        tpot_ms(engine, args.prompt_len, 8, rng)
    if model._stack is None:
        raise SystemExit("this model's layers do not run as a decoder stack")
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for stack in (True, False):
            model.use_decoder_stack = stack
            times[stack].append(tpot_ms(engine, args.prompt_len, args.output_len, rng))
    print(f"one stream, {args.prompt_len} -> {args.output_len}, activations {args.activations}, "
          f"kv cache {args.kv_cache_dtype}; TPOT ms per request, alternating")
    for stack, name in ((True, "decoder stack"), (False, "python layers")):
        print(f"  {name:14s} median {statistics.median(times[stack]):6.2f}  best {min(times[stack]):6.2f}  "
              f"({', '.join(f'{t:.2f}' for t in times[stack])})")
    print(f"  python layers / decoder stack: medians {statistics.median(times[False]) / statistics.median(times[True]):.2f}x, "
          f"best {min(times[False]) / min(times[True]):.2f}x")


if __name__ == "__main__":
    main()
