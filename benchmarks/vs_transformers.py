#!/usr/bin/env python
"""llmserve against transformers' `generate`, same model, dtype, prompts and thread count, in one run.

W1 (throughput): N requests of random prompt tokens, exactly M output tokens each (EOS ignored);
    llmserve gets them all at once (continuous batching), transformers runs static batches of
    --hf-batch-size (all N by default). Reported: output tokens/s of each and the ratio.
W2 (latency): one stream, P prompt tokens, M output tokens, greedy. Reported: TTFT and TPOT
    (TPOT = (E2E - TTFT) / (M - 1)), best of --repeats, and the ratios.

Usage:
    .venv/bin/python benchmarks/vs_transformers.py                  # the default model, full size
    .venv/bin/python benchmarks/vs_transformers.py --quick          # a minute or two
    .venv/bin/python benchmarks/vs_transformers.py --model PATH --dtype bfloat16 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmserve.config import QUANTIZATIONS  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def random_prompts(n: int, length: int, vocab: int, special: set[int], seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    pool = np.array([i for i in range(vocab) if i not in special])
    return [[int(x) for x in rng.choice(pool, size=length)] for _ in range(n)]


# ---- llmserve --------------------------------------------------------------------------------
def llmserve_w1(llm, prompts: list[list[int]], out_len: int) -> dict:
    from llmserve.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"elapsed_s": dt, "output_tokens": n_out, "output_tok_s": n_out / dt}


def llmserve_w2(llm, prompt: list[int], out_len: int) -> dict:
    """One request through the engine's step loop: TTFT when the first token appears."""
    from llmserve.sampling_params import SamplingParams

    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    t0 = time.perf_counter()
    eng.add_request("w2", prompt, params)
    ttft, n = None, 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            n = len(out.outputs[0].token_ids)
            if ttft is None and n:
                ttft = time.perf_counter() - t0
    e2e = time.perf_counter() - t0
    return {"ttft_s": ttft, "e2e_s": e2e, "tpot_s": (e2e - ttft) / max(1, n - 1), "output_tokens": n}


# ---- transformers ----------------------------------------------------------------------------
class _Timer:
    """A generate() streamer that records when each new token arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _hf_kwargs(out_len: int, pad_id: int) -> dict:
    return {"max_new_tokens": out_len, "min_new_tokens": out_len, "do_sample": False, "pad_token_id": pad_id,
            "temperature": None, "top_p": None, "top_k": None}


@torch.inference_mode()
def hf_w1(model, prompts: list[list[int]], out_len: int, batch_size: int, pad_id: int) -> dict:
    t = time.perf_counter()
    n_out = 0
    for i in range(0, len(prompts), batch_size):
        batch = torch.tensor(prompts[i:i + batch_size])  # equal lengths: no padding
        out = model.generate(batch, attention_mask=torch.ones_like(batch), **_hf_kwargs(out_len, pad_id))
        n_out += (out.shape[1] - batch.shape[1]) * batch.shape[0]
    dt = time.perf_counter() - t
    return {"elapsed_s": dt, "output_tokens": n_out, "output_tok_s": n_out / dt}


@torch.inference_mode()
def hf_w2(model, prompt: list[int], out_len: int, pad_id: int) -> dict:
    timer = _Timer()
    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), streamer=timer, **_hf_kwargs(out_len, pad_id))
    e2e = timer.times[-1] - t0
    ttft = timer.times[0] - t0
    n = out.shape[1] - ids.shape[1]
    return {"ttft_s": ttft, "e2e_s": e2e, "tpot_s": (e2e - ttft) / max(1, n - 1), "output_tokens": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder or GGUF file (default: llmserve's embedded model)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--w1-requests", type=int, default=64)
    ap.add_argument("--w1-input-len", type=int, default=256)
    ap.add_argument("--w1-output-len", type=int, default=128)
    ap.add_argument("--hf-batch-size", type=int, default=None, help="transformers' static batch (default: all)")
    ap.add_argument("--w2-input-len", type=int, default=128)
    ap.add_argument("--w2-output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="W2 runs per system (best is reported)")
    ap.add_argument("--quick", action="store_true", help="W1 8 x 64 -> 32, W2 64 -> 32: a short smoke run")
    ap.add_argument("--skip-w1", action="store_true")
    ap.add_argument("--skip-w2", action="store_true")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: llmserve's")
    ap.add_argument("--quantization", default="auto", choices=list(QUANTIZATIONS),
                    help="llmserve's linear weight storage (transformers stays at --dtype); auto keeps a "
                         "GGUF model's own blocks (lossless), none is float")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    if args.quick:
        args.w1_requests, args.w1_input_len, args.w1_output_len = 8, 64, 32
        args.w2_input_len, args.w2_output_len = 64, 32
        args.repeats = min(args.repeats, 2)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from llmserve.entrypoints.llm import LLM
    from llmserve.model.resolve import resolve_model_folder

    folder = resolve_model_folder(args.model)
    print(f"model folder: {folder}\ndtype: {args.dtype}, torch threads: {torch.get_num_threads()}, "
          f"CPU: {cpu_name()} x {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}", flush=True)
    max_len = max(args.w1_input_len + args.w1_output_len, args.w2_input_len + args.w2_output_len)
    llm = LLM(model=str(folder), dtype=args.dtype, device="cpu", max_num_seqs=max(args.w1_requests, 1),
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=max(max_len + 16, 512),
              quantization=args.quantization)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=DTYPES[args.dtype]).eval()
    tok = llm.get_tokenizer()
    vocab = llm.engine.model_config.vocab_size
    special = set(tok.all_special_ids)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    # warm both up (allocators, kernels), untimed
    warm = random_prompts(2, 16, vocab, special, args.seed + 99)
    llmserve_w1(llm, warm, 4)
    hf_w1(hf, warm, 4, 2, pad_id)

    res: dict = {"model_folder": str(folder), "dtype": args.dtype, "quantization": args.quantization,
                 "threads": torch.get_num_threads(),
                 "loadavg_start": os.getloadavg(),
                 "cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__}
    import transformers

    res["transformers"] = transformers.__version__
    if not args.skip_w1:
        prompts = random_prompts(args.w1_requests, args.w1_input_len, vocab, special, args.seed)
        bs = args.hf_batch_size or args.w1_requests
        print(f"\nW1: {args.w1_requests} requests x {args.w1_input_len} prompt tokens -> exactly "
              f"{args.w1_output_len} output tokens; transformers in static batches of {bs}", flush=True)
        ours = llmserve_w1(llm, prompts, args.w1_output_len)
        print(f"  llmserve:     {ours['output_tok_s']:8.2f} output tok/s ({ours['elapsed_s']:.1f} s)", flush=True)
        theirs = hf_w1(hf, prompts, args.w1_output_len, bs, pad_id)
        print(f"  transformers: {theirs['output_tok_s']:8.2f} output tok/s ({theirs['elapsed_s']:.1f} s)", flush=True)
        assert ours["output_tokens"] == theirs["output_tokens"] == args.w1_requests * args.w1_output_len
        ratio = ours["output_tok_s"] / theirs["output_tok_s"]
        print(f"  ratio llmserve / transformers: {ratio:.2f}x", flush=True)
        res["w1"] = {"requests": args.w1_requests, "input_len": args.w1_input_len, "output_len": args.w1_output_len,
                     "hf_batch_size": bs, "llmserve": ours, "transformers": theirs, "throughput_ratio": ratio}
    if not args.skip_w2:
        # A fresh prompt per repeat (the same one for both systems): a repeated prompt would hit
        # llmserve's prefix cache and measure a cached TTFT.
        prompts = random_prompts(args.repeats, args.w2_input_len, vocab, special, args.seed + 1)
        print(f"\nW2: one stream, {args.w2_input_len} prompt -> {args.w2_output_len} output tokens, "
              f"best of {args.repeats}", flush=True)
        ours_runs, hf_runs = [], []
        for prompt in prompts:  # interleaved, so drift in machine load hits both
            ours_runs.append(llmserve_w2(llm, prompt, args.w2_output_len))
            hf_runs.append(hf_w2(hf, prompt, args.w2_output_len, pad_id))

        def best(runs: list[dict]) -> dict:
            return {"ttft_s": min(r["ttft_s"] for r in runs), "tpot_s": min(r["tpot_s"] for r in runs),
                    "ttft_s_median": statistics.median(r["ttft_s"] for r in runs),
                    "tpot_s_median": statistics.median(r["tpot_s"] for r in runs),
                    "output_tokens": runs[0]["output_tokens"]}

        ours, theirs = best(ours_runs), best(hf_runs)
        for name, r in (("llmserve", ours), ("transformers", theirs)):
            print(f"  {name + ':':<14}TTFT {1000 * r['ttft_s']:8.1f} ms   TPOT {1000 * r['tpot_s']:7.2f} ms "
                  f"({r['output_tokens']} tokens)", flush=True)
        ttft_ratio = theirs["ttft_s"] / ours["ttft_s"]
        tpot_ratio = theirs["tpot_s"] / ours["tpot_s"]
        print(f"  speedup (transformers / llmserve): TTFT {ttft_ratio:.2f}x, TPOT {tpot_ratio:.2f}x", flush=True)
        res["w2"] = {"input_len": args.w2_input_len, "output_len": args.w2_output_len, "repeats": args.repeats,
                     "llmserve": ours, "transformers": theirs, "ttft_speedup": ttft_ratio, "tpot_speedup": tpot_ratio}
    res["loadavg_end"] = os.getloadavg()
    print(f"\nload average at the end: {res['loadavg_end'][0]:.2f} (other work on the machine skews both sides)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
