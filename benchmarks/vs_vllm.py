#!/usr/bin/env python
"""llmserve against vLLM (CPU build) on the same model, dtype and prompts, in one run; prints ratios.

Offline: one workload file of token-id prompts (exact lengths, EOS ignored) goes through
    `llmserve bench throughput` and through vLLM's offline `LLM.generate` (benchmarks/vllm_offline.py,
    under vLLM's own interpreter), vLLM once per dtype in --vllm-dtypes (float32 and bfloat16 by
    default). Reported: output tokens/s of each and the ratio against the faster vLLM dtype.
Serve: `vllm serve` then `llmserve serve` on the same folder, one after the other, each loaded by the
    same `llmserve bench serve` client with the same text prompts, arrivals and seed. Reported:
    throughput, TTFT, TPOT, ITL and the ratios.

vLLM runs as its CPU guide configures it (docs.vllm.ai, installation/cpu, "Related runtime environment
variables" and "Performance tips"): OpenMP threads bound to every core this run may use
(VLLM_CPU_OMP_THREADS_BIND, from os.sched_getaffinity; with vLLM's default `auto` binding one core
of a small machine is reserved for its front end), tcmalloc and Intel OpenMP (libiomp5) in
LD_PRELOAD (vLLM's processes only), and the KV cache space set (VLLM_CPU_KVCACHE_SPACE). A preload
library that cannot be found stops the run. llmserve gets the same number of threads
(LLMSERVE_NUM_THREADS) and the same KV cache space (--kv-cache-memory; its own default is 1 GiB, which
holds fewer of W1's float32 tokens than W1 keeps at its end, so it would preempt and recompute where
vLLM does not; --llmserve-kv-space 0 keeps that default). The exact settings go into the summary JSON.

Run it through benchmarks/vs_vllm.sh, which installs vLLM's CPU build in its own venv first:
    benchmarks/vs_vllm.sh                 # both parts, full size (64 x 256 -> 128)
    benchmarks/vs_vllm.sh --quick         # small sizes
    benchmarks/vs_vllm.sh --mode offline  # or serve
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(cmd: list[str], log: Path | None = None, env: dict | None = None) -> None:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    if log is None:
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    else:
        with open(log, "w") as f:
            subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    print("$ " + " ".join(str(c) for c in cmd) + f"  (log: {log})", flush=True)
    f = open(log, "w")  # noqa: SIM115 - the server writes to it until stop()
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """End the server we started, and its children (its own process group), by its id."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def wait_ready(proc: subprocess.Popen, port: int, timeout_s: float, log: Path) -> None:
    """Poll GET /v1/models until the server answers, failing fast if its process dies."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"the server exited with {proc.returncode} before answering; log tail:\n{tail}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RuntimeError(f"the server on port {port} did not answer within {timeout_s:g} s (log: {log})")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def cpu_list(cores: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (the syntax VLLM_CPU_OMP_THREADS_BIND takes)."""
    parts: list[str] = []
    for c in sorted(cores):
        if parts and c == int(parts[-1].split("-")[-1]) + 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{c}"
        else:
            parts.append(str(c))
    return ",".join(parts)


def find_preloads(vllm_python: str) -> dict[str, str]:
    """tcmalloc (system) and Intel OpenMP (pip `intel-openmp` in vLLM's venv), as vLLM's CPU guide
    preloads them. VLLM_TCMALLOC / VLLM_IOMP override; a missing library stops the run."""
    venv = Path(os.path.abspath(vllm_python)).parent.parent
    found: dict[str, str] = {}
    tcmalloc = ["/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
                "/usr/lib64/libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc.so.4",
                "/usr/lib/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc.so.4"]
    for pattern in ("/usr/lib*/libtcmalloc*.so*", "/usr/lib*/*-linux-gnu/libtcmalloc*.so*",
                    "/usr/local/lib*/libtcmalloc*.so*", str(venv / "lib" / "libtcmalloc*.so*")):
        tcmalloc += sorted(glob.glob(pattern))
    iomp = [str(venv / "lib" / "libiomp5.so")]
    for pattern in ("/opt/intel/oneapi/compiler/*/lib/libiomp5.so", "/usr/lib*/*-linux-gnu/libiomp5.so"):
        iomp += sorted(glob.glob(pattern))
    wanted = {
        "tcmalloc": (os.environ.get("VLLM_TCMALLOC"), tcmalloc,
                     "apt-get install libtcmalloc-minimal4 (or google-perftools), or set VLLM_TCMALLOC=/path/to/it"),
        "iomp": (os.environ.get("VLLM_IOMP"), iomp,
                 f"{venv}/bin/pip install intel-openmp (vs_vllm.sh does), or set VLLM_IOMP=/path/to/libiomp5.so"),
    }
    for name, (override, candidates, fix) in wanted.items():
        if override:
            if not Path(override).is_file():
                sys.exit(f"{name}: {override} (from the environment) is not a file")
            found[name] = override
            continue
        hit = next((c for c in candidates if Path(c).is_file() and "debug" not in Path(c).name), None)
        if hit is None:
            sys.exit(f"vLLM's CPU guide preloads {name}, and it was not found (looked in: {', '.join(candidates[:6])}"
                     f"{' ...' if len(candidates) > 6 else ''}). Fix: {fix}. Refusing to run vLLM unconfigured.")
        found[name] = hit
    return found


def vllm_setup(args) -> tuple[dict, dict]:
    """vLLM's environment, configured as its CPU guide says, and the record of it for the JSON."""
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = affinity[: args.threads]
    bind = args.vllm_bind or cpu_list(cores)
    pre = find_preloads(args.vllm_python)
    ld_preload = ":".join([pre["tcmalloc"], pre["iomp"], *([os.environ["LD_PRELOAD"]] if os.environ.get("LD_PRELOAD")
                                                           else [])])
    settings = {
        "VLLM_CPU_OMP_THREADS_BIND": bind,
        "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_space),
        "LD_PRELOAD": ld_preload,
    }
    env = dict(os.environ, **settings)
    # VLLM_CPU_NUM_OF_RESERVED_CPU only acts with VLLM_CPU_OMP_THREADS_BIND=auto; an explicit list is
    # used as given. OMP_NUM_THREADS stays unset: vLLM sets it (and KMP_AFFINITY, with libiomp5) for its
    # worker from the binding, and keeps its other processes at one torch thread unless OMP_NUM_THREADS
    # comes from outside (then they spin on as many; vLLM warns about it).
    env.pop("VLLM_CPU_NUM_OF_RESERVED_CPU", None)
    env.pop("OMP_NUM_THREADS", None)
    probe = subprocess.run([args.vllm_python, "-c", "import importlib.metadata as m, torch; "
                            "print(m.version('vllm-cpu') if any(d.metadata['Name'] == 'vllm-cpu' for d in "
                            "m.distributions()) else m.version('vllm')); print(torch.__version__)"],
                           capture_output=True, text=True, env=env, cwd=ROOT)
    lines = probe.stdout.split()
    record = {"env": settings, "VLLM_CPU_NUM_OF_RESERVED_CPU": "unset (it only applies to the `auto` binding)",
              "OMP_NUM_THREADS": "unset (vLLM derives it for its worker from the binding)",
              "affinity_of_this_run": cpu_list(affinity), "threads": len(cores),
              "vllm_version": lines[0] if lines else None, "vllm_torch_version": lines[1] if len(lines) > 1 else None,
              "guide": "https://docs.vllm.ai/en/latest/getting_started/installation/cpu.html"}
    print("vLLM environment (only vLLM's processes get it):\n" + "\n".join(f"  {k}={v}" for k, v in settings.items())
          + f"\n  vLLM {record['vllm_version']}, torch {record['vllm_torch_version']}", flush=True)
    return env, record


def binding_lines(log: Path) -> list[str]:
    """What vLLM says about its thread binding and preloads, to check the settings took effect."""
    pat = re.compile(r"OpenMP|OMP_|thread.*bind|bind.*thread|core ids|reserved_cpus|reserve_cpu_num|tcmalloc|iomp|"
                     r"KV cache|cpu_worker", re.IGNORECASE)
    try:
        return [ln.strip()[:300] for ln in log.read_text(errors="replace").splitlines() if pat.search(ln)][:20]
    except OSError:
        return []


def offline(args, folder: Path, out: Path, vllm_env: dict, ours_env: dict) -> dict:
    from llmserve.bench.workloads import (
        PromptFactory,
        build_requests,
        write_workload_file,
    )
    from llmserve.tokenizer import load_tokenizer

    tok = load_tokenizer(folder)
    reqs = build_requests("random", args.num_requests, PromptFactory(tok, seed=args.seed), as_ids=True,
                          input_len=args.input_len, output_len=args.output_len)
    wl = out / "offline_workload.jsonl"
    write_workload_file(wl, reqs)
    limits = ["--max-model-len", str(args.max_model_len)]
    ours_limits = limits + llmserve_kv_flags(args)
    dtypes = [d for d in args.vllm_dtypes.split(",") if d]
    print(f"\n== offline: {args.num_requests} requests x {args.input_len} prompt tokens -> exactly "
          f"{args.output_len} output tokens, greedy; llmserve {args.dtype}, vLLM {' and '.join(dtypes)}; best of "
          f"{args.repeats} (alternating)", flush=True)
    variants = {"llmserve": [], **{f"llmserve {name}": shlex.split(extra) for name, extra in
                                   (v.split("=", 1) for v in args.llmserve_variant)}}
    runs: dict[str, list[dict]] = {**{v: [] for v in variants}, **{f"vLLM {d}": [] for d in dtypes}}
    binding: dict[str, list[str]] = {}
    for i in range(args.repeats):  # alternate, so a burst of load from elsewhere hits one run, not one side
        print(f"  run {i + 1}: load average {os.getloadavg()[0]:.2f}", flush=True)
        for name, extra in variants.items():
            tag = name.replace(" ", "_")
            ours_json = out / f"offline_{tag}_{i}.json"
            run([sys.executable, "-m", "llmserve.cli", "bench", "throughput", "--model", str(folder), "--workload-file",
                 str(wl), "--ignore-eos", "--temperature", "0", "--output-json", str(ours_json), "--disable-tqdm",
                 "--dtype", args.dtype, *ours_limits, *extra], log=out / f"offline_{tag}_{i}.log", env=ours_env)
            r = json.loads(ours_json.read_text())
            r["load_average_after"] = os.getloadavg()
            r["extra_args"] = extra
            runs[name].append(r)
        for d in (dtypes if i % 2 == 0 else dtypes[::-1]):
            vllm_json, log = out / f"offline_vllm_{d}_{i}.json", out / f"offline_vllm_{d}_{i}.log"
            run([args.vllm_python, str(ROOT / "benchmarks" / "vllm_offline.py"), "--model", str(folder),
                 "--workload-file", str(wl), "--output-json", str(vllm_json), "--dtype", d, *limits], log=log,
                env=vllm_env)
            r = json.loads(vllm_json.read_text())
            r["load_average_after"] = os.getloadavg()
            runs[f"vLLM {d}"].append(r)
            binding.setdefault(d, binding_lines(log))
    best = {k: max(v, key=lambda r: r["output_tokens_per_second"]) for k, v in runs.items()}
    print(f"{'':16}{'output tok/s':>14}{'total tok/s':>14}{'req/s':>10}{'time s':>10}   all runs (output tok/s)")
    for name, r in best.items():
        every = ", ".join(f"{x['output_tokens_per_second']:.2f}" for x in runs[name])
        print(f"{name:16}{r['output_tokens_per_second']:14.2f}{r['tokens_per_second']:14.2f}"
              f"{r['requests_per_second']:10.3f}{r['elapsed_time']:10.1f}   {every}")
    faster = max(dtypes, key=lambda d: best[f"vLLM {d}"]["output_tokens_per_second"])
    ours, theirs = best["llmserve"], best[f"vLLM {faster}"]
    print(f"baseline: vLLM {faster} (the faster of vLLM's dtypes)")
    for name in variants:
        print(f"ratio {name} / vLLM {faster} (output tok/s, best runs): "
              f"{ratio(best[name]['output_tokens_per_second'], theirs['output_tokens_per_second'])}", flush=True)
    return {"llmserve": ours, "vllm": theirs, "vllm_baseline_dtype": faster,
            "llmserve_variants": {name: best[name] for name in variants},
            "vllm_by_dtype": {d: best[f"vLLM {d}"] for d in dtypes}, "all_runs": runs,
            "vllm_binding_log_lines": binding,
            "output_throughput_ratio": ours["output_tokens_per_second"] / theirs["output_tokens_per_second"],
            "output_throughput_ratio_by_vllm_dtype": {
                d: ours["output_tokens_per_second"] / best[f"vLLM {d}"]["output_tokens_per_second"] for d in dtypes}}


def llmserve_kv_flags(args) -> list[str]:
    """llmserve's KV cache budget: --llmserve-kv-space GiB, as vLLM's VLLM_CPU_KVCACHE_SPACE is set."""
    return ["--kv-cache-memory", str(args.llmserve_kv_space << 30)] if args.llmserve_kv_space else []


def serve(args, folder: Path, out: Path, vllm_env: dict, ours_env: dict) -> dict:
    client = [sys.executable, "-m", "llmserve.cli", "bench", "serve", "--tokenizer", str(folder), "--workload",
              args.serve_workload, "--num-prompts", str(args.serve_num_prompts), "--input-len", str(args.input_len),
              "--output-len", str(args.output_len), "--max-input-len", str(args.input_len),
              "--max-output-len", str(args.output_len), "--request-rate", args.serve_rates,
              "--workload-seed", str(args.seed), "--disable-tqdm",
              "--metric-percentiles", "50,90,99"]
    if args.max_concurrency:
        client += ["--max-concurrency", str(args.max_concurrency)]
    if args.serve_temperature is not None:
        client += ["--temperature", str(args.serve_temperature)]
    vllm_dtype = args.serve_vllm_dtype or args.dtype
    if args.goodput:
        client += ["--goodput", *args.goodput]
    # The API server module, not the `vllm` script: vllm-cpu's distribution is not named "vllm", and the
    # script's version lookup fails on that.
    servers = {
        "vLLM": ([args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--host",
                  "127.0.0.1", "--port", str(args.vllm_port), "--dtype",
                  vllm_dtype, "--max-model-len", str(args.max_model_len), "--served-model-name", "bench-model",
                  "--seed", "0"], vllm_env, args.vllm_port),
        "llmserve": ([sys.executable, "-m", "llmserve.cli", "serve", str(folder), "--host", "127.0.0.1", "--port",
                      str(args.llmserve_port), "--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
                      "--served-model-name", "bench-model", *llmserve_kv_flags(args),
                      *shlex.split(args.serve_llmserve_flags)], ours_env,
                     args.llmserve_port),
    }
    print(f"\n== serve: {args.serve_num_prompts} requests ({args.serve_workload}, {args.input_len} -> "
          f"{args.output_len}), rates {args.serve_rates}, text prompts", flush=True)
    results = {}
    for name, (cmd, env, port) in servers.items():
        tag = name.lower()
        log = out / f"serve_{tag}_server.log"
        proc = start(cmd, log, env)
        try:
            t0 = time.monotonic()
            wait_ready(proc, port, args.startup_timeout, log)
            print(f"  {name}: up after {time.monotonic() - t0:.0f} s", flush=True)
            t0 = time.monotonic()
            run(client + ["--base-url", f"http://127.0.0.1:{port}", "--label", name, "--output-json",
                          str(out / f"serve_{tag}.json"), "--plot", str(out / f"serve_{tag}.png")],
                log=out / f"serve_{tag}_client.log")
            print(f"  {name}: benchmark done in {time.monotonic() - t0:.0f} s", flush=True)
        finally:
            stop(proc)
        results[name] = json.loads((out / f"serve_{tag}.json").read_text())
    keys = [("output_throughput", "output tok/s", True), ("request_throughput", "req/s", True),
            ("median_ttft_ms", "median TTFT ms", False), ("p99_ttft_ms", "p99 TTFT ms", False),
            ("median_tpot_ms", "median TPOT ms", False), ("median_itl_ms", "median ITL ms", False),
            ("median_e2el_ms", "median E2E ms", False)]
    summary = []
    for i, run_ours in enumerate(results["llmserve"]["runs"]):
        run_vllm = results["vLLM"]["runs"][i]
        rate = run_ours["request_rate"]
        print(f"rate {rate}: {'':18}{'llmserve':>12}{'vLLM':>12}{'ratio':>10}")
        row = {"request_rate": rate}
        for key, label, higher_better in keys:
            a, b = run_ours["metrics"][key], run_vllm["metrics"][key]
            # ratios read "llmserve is N x as good": throughput ours/theirs, latency theirs/ours
            r = (a / b if b else float("nan")) if higher_better else (b / a if a else float("nan"))
            row[key] = {"llmserve": a, "vllm": b, "ratio": r}
            print(f"  {label:24}{a:12.2f}{b:12.2f}{r:9.2f}x")
        summary.append(row)
    print("(ratio > 1: llmserve better; throughput llmserve/vLLM, latency vLLM/llmserve)", flush=True)
    out_summary: dict = {"runs": summary, "vllm_dtype": vllm_dtype, "llmserve_flags": args.serve_llmserve_flags,
                         "temperature": args.serve_temperature}
    if args.goodput:
        for name in ("llmserve", "vLLM"):
            r = results[name]
            att = ", ".join(f"{run['request_rate']}: {run['metrics']['slo_attainment']:.0%}" for run in r["runs"])
            print(f"{name}: goodput rate (>= {r.get('slo_target', 0.9):.0%} meet {' '.join(args.goodput)}): "
                  f"{r.get('goodput_rate')} req/s; attainment by rate: {att}", flush=True)
            out_summary[f"goodput_rate_{name.lower()}"] = r.get("goodput_rate")
    return out_summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", default=str(ROOT / "bench-results" / "vllm-venv" / "bin" / "python"))
    ap.add_argument("--model", default=None, help="HF folder or GGUF (default: llmserve's embedded model)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="llmserve's dtype, and vLLM's when serving")
    ap.add_argument("--vllm-dtypes", default="float32,bfloat16",
                    help="offline: vLLM runs once per dtype each repeat; the faster is the baseline")
    ap.add_argument("--mode", default="both", choices=["offline", "serve", "both"])
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--serve-workload", default="random")
    ap.add_argument("--serve-num-prompts", type=int, default=32)
    ap.add_argument("--serve-rates", default="inf")
    ap.add_argument("--max-concurrency", type=int, default=None)
    ap.add_argument("--serve-vllm-dtype", default=None, choices=["float32", "bfloat16"],
                    help="vLLM's dtype when serving (default: --dtype); its faster one on a CPU with bf16 is bfloat16")
    ap.add_argument("--serve-llmserve-flags", default="", help="extra `llmserve serve` flags, e.g. '--activations q8'")
    ap.add_argument("--serve-temperature", type=float, default=None, help="the client's temperature (default: greedy)")
    ap.add_argument("--goodput", nargs="+", default=None)
    ap.add_argument("--vllm-port", type=int, default=8100)
    ap.add_argument("--llmserve-port", type=int, default=8101)
    ap.add_argument("--threads", type=int,
                    default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                    help="cores for each engine (default: all this process may use): vLLM's OpenMP threads are bound "
                         "to the first N of them, llmserve gets LLMSERVE_NUM_THREADS=N")
    ap.add_argument("--vllm-bind", default=None,
                    help="VLLM_CPU_OMP_THREADS_BIND as given (default: the --threads cores of this run's affinity)")
    ap.add_argument("--vllm-kv-space", type=int, default=int(os.environ.get("VLLM_CPU_KVCACHE_SPACE", 4)),
                    help="VLLM_CPU_KVCACHE_SPACE, whole GiB (vLLM's CPU guide: 4 by default)")
    ap.add_argument("--llmserve-kv-space", type=int, default=None,
                    help="llmserve's KV cache space, whole GiB (default: --vllm-kv-space, the same budget; "
                         "0: llmserve's own default)")
    ap.add_argument("--startup-timeout", type=float, default=1200)
    ap.add_argument("--repeats", type=int, default=2, help="offline runs per engine, alternating; best reported")
    ap.add_argument("--llmserve-variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="also run llmserve with these engine flags (offline), e.g. "
                         "'q8=--activations q8 --kv-cache-dtype float16'; repeatable")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="8 x 64 -> 32 offline, 8 requests served")
    ap.add_argument("--out-dir", default=str(ROOT / "bench-results" / "vs_vllm"))
    args = ap.parse_args()
    if args.llmserve_kv_space is None:
        args.llmserve_kv_space = args.vllm_kv_space
    if args.quick:
        args.num_requests, args.input_len, args.output_len, args.serve_num_prompts = 8, 64, 32, 8
    if not Path(args.vllm_python).exists():
        sys.exit(f"no vLLM interpreter at {args.vllm_python}: run benchmarks/vs_vllm.sh to install it")
    from llmserve.model.resolve import resolve_model_folder

    folder = resolve_model_folder(args.model)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vllm_env, vllm_record = vllm_setup(args)
    ours_env = dict(os.environ, LLMSERVE_NUM_THREADS=str(vllm_record["threads"]))
    kv = f"{args.llmserve_kv_space} GiB" if args.llmserve_kv_space else "its default"
    print(f"model folder: {folder}\nllmserve: {args.dtype}, LLMSERVE_NUM_THREADS={vllm_record['threads']}, KV cache "
          f"{kv}; results in {out}", flush=True)
    import platform

    import torch

    res: dict = {"model_folder": str(folder), "dtype": args.dtype, "args": vars(args), "vllm_settings": vllm_record,
                 "llmserve_settings": {"LLMSERVE_NUM_THREADS": str(vllm_record["threads"]), "torch": torch.__version__,
                                       "kv_cache_space_gib": args.llmserve_kv_space or "llmserve's default"},
                 "machine": {"cpu": _cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform()},
                 "llmserve_code": _git_state(), "load_average_start": os.getloadavg()}
    if args.mode in ("offline", "both"):
        res["offline"] = offline(args, folder, out, vllm_env, ours_env)
    if args.mode in ("serve", "both"):
        res["serve"] = serve(args, folder, out, vllm_env, ours_env)
    summary = out / f"summary_{args.mode}{'_quick' if args.quick else ''}.json"
    summary.write_text(json.dumps(res, indent=1, default=str))
    print(f"\nwrote {summary}")


def _git_state() -> dict:
    """The llmserve code measured: commit, and the files that differ from it (kernels build from the tree)."""
    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT)
        return r.stdout.rstrip() if r.returncode == 0 else ""  # keep porcelain's leading status column
    return {"commit": git("rev-parse", "HEAD").strip(),
            "modified": [ln[3:] for ln in git("status", "--porcelain", "--untracked-files=no").splitlines()]}


def _cpu_model() -> str | None:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), None)
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    keep = [f for f in flags if f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
                                      "amx_bf16", "amx_int8", "amx_tile")]
    return f"{model}; {' '.join(keep)}"


if __name__ == "__main__":
    main()
