"""`llmserve bench throughput`: offline throughput of the engine on a workload, all requests at once."""
from __future__ import annotations

import time
from collections.abc import Sequence

from llmserve.bench.spec_counters import spec_decode_summary
from llmserve.bench.workloads import BenchRequest


def measure_throughput(llm, reqs: Sequence[BenchRequest], *, ignore_eos: bool, temperature: float = 1.0,
                       warmup: int = 1, progress: bool = True, seed: int = 0) -> dict:
    """Run every request through `llm` (an llmserve LLM) in one call and time it."""
    from llmserve.sampling_params import SamplingParams

    if warmup > 0:  # first-call costs (allocator, kernels) stay out of the timed run
        n = min(16, llm.engine.max_model_len - 5)
        llm.generate([[1 + (i % 50)] * n for i in range(warmup)], SamplingParams(max_tokens=4, ignore_eos=True),
                     use_tqdm=False)
    prompts = [r.prompt for r in reqs]
    params = [SamplingParams(temperature=temperature, max_tokens=r.output_len, ignore_eos=ignore_eos,
                             seed=None if temperature == 0 else seed + i) for i, r in enumerate(reqs)]
    before = llm.engine.stats()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=progress)
    elapsed = time.perf_counter() - start
    spec = spec_decode_summary(before, llm.engine.stats())
    total_in = sum(len(o.prompt_token_ids) for o in outs)
    total_out = sum(len(c.token_ids) for o in outs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outs)
    return {
        "elapsed_time": elapsed,
        "num_requests": len(outs),
        "total_prompt_tokens": total_in,
        "total_output_tokens": total_out,
        "total_num_tokens": total_in + total_out,
        "requested_output_tokens": sum(r.output_len for r in reqs),
        "num_cached_prompt_tokens": cached,
        "requests_per_second": len(outs) / elapsed,
        "output_tokens_per_second": total_out / elapsed,
        "tokens_per_second": (total_in + total_out) / elapsed,
        **spec,
    }


def format_throughput(r: dict) -> str:
    return (f"Throughput: {r['requests_per_second']:.3f} requests/s, "
            f"{r['tokens_per_second']:.2f} total tokens/s, {r['output_tokens_per_second']:.2f} output tokens/s\n"
            f"  {r['num_requests']} requests, {r['total_prompt_tokens']} prompt + {r['total_output_tokens']} output "
            f"tokens in {r['elapsed_time']:.2f} s ({r['num_cached_prompt_tokens']} prompt tokens from the prefix cache)"
            + (f"\n  speculative decoding: acceptance rate {r['spec_decode_acceptance_rate']:.1%} "
               f"({r['spec_decode_num_accepted_tokens']} of {r['spec_decode_num_draft_tokens']} draft tokens), "
               f"{r['spec_decode_mean_tokens_per_verify']:.2f} tokens per verify step"
               if r.get("spec_decode_num_drafts") else ""))
