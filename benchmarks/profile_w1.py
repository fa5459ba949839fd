"""Where W1's time goes: prefill and decode separately, by part, against the machine's peaks.

    .venv/bin/python benchmarks/profile_w1.py [--requests 64 --input-len 256 --output-len 128]
    .venv/bin/python benchmarks/profile_w1.py --workload chat --requests 60 --input-len 1024 --output-len 256

With `--workload chat` (or code, summarization) the lengths are the workload's log-normal shapes,
capped at --input-len / --output-len, as `llmserve bench serve --workload chat` draws them.

W1 is 64 requests x 256 random prompt tokens -> exactly 128 output tokens, all submitted at once,
on the embedded model with the default settings. Every step is timed whole, and inside it the
projections, attention, logits head and sampler (each wrapped in a timer; the wrappers cost about
a microsecond a call). "Python" is the rest of the step: scheduling, the update point, the runner's
batch bookkeeping, norms and other small ops. A step that carries any prefill chunk counts as
prefill, one with decodes only as decode.

The decoder layers run as one C++ call where the model allows it (model/decoder_stack.py), which
cannot be timed by part: by default it is turned off here and the Python layers run (the same
kernels, bit for bit the same results, plus the Python between them). With --decoder-stack it
stays on and its calls are timed whole, as "decoder stack" (the head and sampler still by part).

Peaks, measured here in the same run: float32 FMA throughput (a large oneDNN matmul on all
threads: the practical compute ceiling) and memory read bandwidth (summing a 1 GiB tensor).
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch

from llmserve import LLM, SamplingParams
from llmserve.bench.workloads import SHAPES, sample_lengths
from llmserve.model.linear import Projection


def measure_peaks() -> dict[str, float]:
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    gflops = 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9
    big = torch.ones(1 << 28)  # 1 GiB of float32
    big.sum()
    start, reps = time.perf_counter(), 5
    for _ in range(reps):
        big.sum()
    gbs = big.numel() * 4 * reps / (time.perf_counter() - start) / 1e9
    return {"fp32_gflops": gflops, "read_gbs": gbs}


class Timers:
    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.flops = 0.0

    def wrap(self, obj, name: str, part: str, flops=None) -> None:
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.current[part] += time.perf_counter() - start
            if flops is not None:
                self.flops += flops(*args)
            return out

        object.__setattr__(obj, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--workload", default="random", choices=["random", *SHAPES],
                    help="random: every request --input-len -> --output-len; otherwise the workload's shapes, capped there")
    ap.add_argument("--seed", type=int, default=None,
                    help="a per-request seed (each request then draws with its own generator); unset: as W1")
    ap.add_argument("--activations", default="float32", choices=["float32", "q8"],
                    help="q8: 8-bit activations on the GGUF layers (the opt-in fast path)")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float16", "bfloat16", "fp8", "fp8_e5m2"],
                    help="the KV cache's storage dtype (auto: the model's)")
    ap.add_argument("--model", default=None, help="a model folder or GGUF file (default: the embedded model)")
    ap.add_argument("--by-format", action="store_true", help="split the projections by their weight format")
    ap.add_argument("--decoder-stack", action="store_true",
                    help="keep the layers' one C++ call (timed whole) instead of timing the Python layers by part")
    ap.add_argument("--json", default="bench-results/profile_w1.json")
    args = ap.parse_args()

    llm = LLM(model=args.model, activations=args.activations, kv_cache_dtype=args.kv_cache_dtype)  # sets the thread count the engine runs with; the peaks are measured with it
    peaks = measure_peaks()
    engine, model = llm.engine, llm.engine.runner.model
    timers = Timers()
    for m in model.modules():
        if isinstance(m, Projection):
            out_features = m.impl(torch.zeros(1, _in_features(m))).shape[-1]
            fmt = getattr(m.impl, "fmt", "float")
            part = "logits head" if m is model.lm_head else f"projections {fmt}" if args.by_format else "projections"
            timers.wrap(m, "_compute", part, lambda x, k=out_features: 2.0 * x.shape[0] * x.shape[1] * k)
    backend = engine.runner.backend
    timers.wrap(backend, "forward", "attention")
    model.use_decoder_stack = args.decoder_stack
    if args.decoder_stack:
        llm.generate([[11] * 4], SamplingParams(max_tokens=1), use_tqdm=False)  # builds the stack
        if model._stack is None:
            raise SystemExit("this model's layers do not run as a decoder stack")
        model._stack = SimpleNamespace(forward=model._stack.forward)  # a C++ object takes no new attributes
        timers.wrap(model._stack, "forward", "decoder stack")
    timers.wrap(engine.runner, "sampler", "sampler")

    g = torch.Generator().manual_seed(0)
    vocab = engine.model_config.vocab_size
    llm.generate([[11] * 16], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    lengths = sample_lengths(args.workload, args.requests, input_len=args.input_len, output_len=args.output_len,
                             max_input_len=args.input_len, max_output_len=args.output_len)
    for i, (n_in, n_out) in enumerate(lengths):
        params = SamplingParams(temperature=1.0, max_tokens=n_out, ignore_eos=True, seed=args.seed)
        engine.add_request(f"w1-{i}", torch.randint(0, vocab, (n_in,), generator=g).tolist(), params)
    phases = {p: defaultdict(float) for p in ("prefill", "decode")}
    counts = {p: {"steps": 0, "proj_flops": 0.0} for p in phases}
    total_start = time.perf_counter()
    while engine.has_unfinished_requests():
        sched = engine.scheduler
        timers.current, timers.flops = defaultdict(float), 0.0
        # Before the step: a prompt still being prefilled, or one waiting to be admitted.
        prefill = bool(sched.waiting) or any(r.num_computed_tokens < r.num_tokens - 1 for r in sched.running)
        start = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - start
        phase = "prefill" if prefill else "decode"
        phases[phase]["step"] += elapsed
        for part, t in timers.current.items():
            phases[phase][part] += t
        counts[phase]["steps"] += 1
        counts[phase]["proj_flops"] += timers.flops
    wall = time.perf_counter() - total_start

    report = {"peaks": peaks, "wall_s": wall, "workload": args.workload, "lengths": {
                  "prompt_tokens": sum(a for a, _ in lengths), "output_tokens": sum(b for _, b in lengths)},
              "preemptions": engine.scheduler.num_preemptions,
              "activations": args.activations, "decoder_stack": args.decoder_stack, "threads": torch.get_num_threads(), "phases": {}}
    print(f"peaks: fp32 {peaks['fp32_gflops']:.0f} GFLOP/s (oneDNN 2048^3), read {peaks['read_gbs']:.1f} GB/s; "
          f"{torch.get_num_threads()} threads; wall {wall:.1f} s, {engine.scheduler.num_preemptions} preemptions")
    for phase, parts in phases.items():
        step = parts["step"]
        named = sum(v for k, v in parts.items() if k != "step")
        rows = {k: v for k, v in parts.items() if k != "step"}
        rows["python and small ops"] = step - named
        linear_s = sum(v for k, v in parts.items() if k.startswith("projections") or k == "logits head")
        gflops = counts[phase]["proj_flops"] / max(linear_s, 1e-9) / 1e9
        report["phases"][phase] = {"steps": counts[phase]["steps"], "seconds": step, "parts_s": rows,
                                   "linear_gflops": gflops}
        print(f"\n{phase}: {counts[phase]['steps']} steps, {step:.2f} s; projections + head at {gflops:.0f} GFLOP/s "
              f"({100 * gflops / peaks['fp32_gflops']:.0f}% of the fp32 peak)")
        for k, v in sorted(rows.items(), key=lambda kv: -kv[1]):
            print(f"  {k:22s} {v:7.2f} s  {100 * v / step:5.1f}%")
    Path(args.json).parent.mkdir(exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))


def _in_features(p: Projection) -> int:
    impl = p.impl
    impl = impl.parts[0] if hasattr(impl, "parts") else impl  # a fused projection stored as shards
    return impl.in_features if hasattr(impl, "in_features") else impl.weight.shape[1]


if __name__ == "__main__":
    main()
