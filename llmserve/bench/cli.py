"""`llmserve bench throughput` (offline, in process) and `llmserve bench serve` (an HTTP client of any
OpenAI-compatible server)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

from llmserve.bench.workloads import WORKLOADS


def _add_workload_args(p: argparse.ArgumentParser, num_prompts: int) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--workload", choices=WORKLOADS, default="random",
                   help="random: fixed (or --range-ratio) lengths; chat/code/summarization: log-normal trace "
                        "shapes; shared-prefix: --num-prefixes prefixes of --prefix-len tokens plus "
                        "--input-len tokens each; copy: a passage of --input-len tokens the answer repeats "
                        "(speculative decoding's case); file: --workload-file")
    g.add_argument("--workload-file", default=None,
                   help="JSONL: {\"prompt\": str} or {\"prompt_token_ids\": [int]}, and {\"output_len\": int}")
    g.add_argument("--num-prompts", type=int, default=None,
                   help=f"requests (unset: {num_prompts}, or every line of a workload file)")
    p.set_defaults(default_num_prompts=num_prompts)
    g.add_argument("--input-len", type=int, default=256, help="prompt tokens (random, shared-prefix suffix)")
    g.add_argument("--output-len", type=int, default=128, help="output tokens (random, shared-prefix)")
    g.add_argument("--range-ratio", type=float, default=0.0,
                   help="sample lengths uniformly in [len*(1-r), len*(1+r)] (0: fixed)")
    g.add_argument("--max-input-len", type=int, default=2048, help="truncate log-normal prompt lengths here")
    g.add_argument("--max-output-len", type=int, default=1024, help="truncate log-normal output lengths here")
    g.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: tokens in each shared prefix")
    g.add_argument("--num-prefixes", type=int, default=4, help="shared-prefix: distinct prefixes")
    g.add_argument("--workload-seed", type=int, default=0, help="seed of lengths, prompts and arrivals")
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=None,
                   help="generate exactly the requested output lengths (unset: on for synthetic workloads, "
                        "off for a workload file)")
    g.add_argument("--temperature", type=float, default=None,
                   help="unset: 1.0 for throughput (as vllm bench throughput), 0 (greedy) for serve")
    g.add_argument("--disable-tqdm", action="store_true")


def _workload_name(args) -> str:
    if args.workload_file and args.workload == "random":
        return "file"
    return args.workload


def _ignore_eos(args) -> bool:
    return args.ignore_eos if args.ignore_eos is not None else _workload_name(args) != "file"


def _build(args, factory, as_ids: bool, max_total_len: int | None):
    from llmserve.bench.workloads import build_requests

    name = _workload_name(args)
    n = args.num_prompts
    if n is None:
        n = 0 if name == "file" else args.default_num_prompts  # 0: the whole file
    elif n < 1:
        raise ValueError("--num-prompts must be at least 1")
    return build_requests(name, n, factory, as_ids=as_ids, seed=args.workload_seed,
                          input_len=args.input_len, output_len=args.output_len, range_ratio=args.range_ratio,
                          max_input_len=args.max_input_len, max_output_len=args.max_output_len,
                          prefix_len=args.prefix_len, num_prefixes=args.num_prefixes,
                          workload_file=args.workload_file, max_total_len=max_total_len)


def _workload_config(args) -> dict:
    name = _workload_name(args)
    cfg = {"workload": name, "seed": args.workload_seed, "ignore_eos": _ignore_eos(args)}
    if name == "file":
        cfg["workload_file"] = str(args.workload_file)
    elif name in ("random", "shared-prefix", "copy"):
        cfg.update(input_len=args.input_len, output_len=args.output_len, range_ratio=args.range_ratio)
        if name == "shared-prefix":
            cfg.update(prefix_len=args.prefix_len, num_prefixes=args.num_prefixes)
    else:
        cfg.update(max_input_len=args.max_input_len, max_output_len=args.max_output_len)
    return cfg


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "loadavg_1_5_15": load}


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# ---- throughput ------------------------------------------------------------------------------
def _cmd_throughput(args: argparse.Namespace) -> None:
    from llmserve.bench.throughput import format_throughput, measure_throughput
    from llmserve.bench.workloads import PromptFactory, workload_summary
    from llmserve.cli import engine_kwargs
    from llmserve.entrypoints.llm import LLM

    kwargs = engine_kwargs(args)
    llm = LLM(**kwargs)
    factory = PromptFactory(llm.get_tokenizer(), vocab_size=llm.engine.model_config.vocab_size,
                            seed=args.workload_seed)
    try:
        reqs = _build(args, factory, as_ids=True, max_total_len=llm.engine.max_model_len)
    except ValueError as e:
        _fail(str(e))
    temperature = 1.0 if args.temperature is None else args.temperature
    result = measure_throughput(llm, reqs, ignore_eos=_ignore_eos(args), temperature=temperature,
                                warmup=args.warmup, progress=not args.disable_tqdm, seed=args.workload_seed)
    print(format_throughput(result))
    if args.output_json:
        from llmserve.bench.serve import write_json

        out = {"benchmark": "throughput", "date": datetime.now(UTC).isoformat(timespec="seconds"),
               **result, "workload": {**_workload_config(args), **workload_summary(reqs)},
               "temperature": temperature, "engine": {k: v for k, v in kwargs.items()},
               "model_name": llm.engine.model_name, "machine": _machine()}
        write_json(args.output_json, out)
        print(f"wrote {args.output_json}")


# ---- serve -----------------------------------------------------------------------------------
def _load_tokenizer(args, model: str):
    """The tokenizer that sizes prompts: --tokenizer, else the served model's folder if it is a local
    one, else llmserve's default model if that is what is served (by its name) or the prompts are
    token ids (which only llmserve takes). Text sized a word a token runs a few tokens long, and a
    prompt one token over the server's chunk budget costs a whole extra step before its first token."""
    from llmserve.errors import ModelLoadError
    from llmserve.model.default_model import DEFAULT_MODEL_NAME
    from llmserve.model.resolve import resolve_model_folder
    from llmserve.tokenizer import load_tokenizer

    source = args.tokenizer
    if source is None and model and Path(model).expanduser().is_dir():
        source = model
    if source is not None:
        return load_tokenizer(resolve_model_folder(None if source == "default" else source))
    if args.prompt_format == "ids":
        return load_tokenizer(resolve_model_folder(None))
    if model == DEFAULT_MODEL_NAME:
        try:
            return load_tokenizer(resolve_model_folder(None))
        except ModelLoadError:  # benchmarking a server elsewhere, without the default model here
            return None
    return None


def _cmd_serve(args: argparse.Namespace) -> None:
    import asyncio

    import httpx

    from llmserve.bench.client import ClientConfig, send_request
    from llmserve.bench.metrics import fmt_rate, parse_goodput, parse_percentiles
    from llmserve.bench.serve import (
        default_result_paths,
        discover_model,
        parse_rates,
        run_sweep,
        wait_for_server,
        write_json,
    )
    from llmserve.bench.workloads import BenchRequest, PromptFactory, workload_summary

    try:
        rates = parse_rates(args.request_rate)
        slos = parse_goodput(args.goodput)
        percentiles = parse_percentiles(args.metric_percentiles)
        extra_body = json.loads(args.extra_body) if args.extra_body else {}
        if args.max_concurrency is not None and args.max_concurrency < 1:
            raise ValueError("--max-concurrency must be at least 1")
        if not 0 < args.slo_attainment <= 1:
            raise ValueError("--slo-attainment must be in (0, 1]")
    except (ValueError, json.JSONDecodeError) as e:
        _fail(str(e))
    endpoint = args.endpoint if args.endpoint.startswith("/") else "/" + args.endpoint
    headers = {}
    if os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    for h in args.header or []:
        k, sep, v = h.partition("=")
        if not sep:
            _fail(f"--header takes KEY=VALUE, got {h!r}")
        headers[k.strip()] = v.strip()
    try:
        if args.wait_for_server > 0:
            wait_for_server(args.base_url, args.wait_for_server)
        model = args.model or discover_model(args.base_url, headers)
    except RuntimeError as e:
        _fail(str(e))
    chat = endpoint.rstrip("/").endswith("chat/completions")
    if chat and args.prompt_format == "ids":
        _fail("the chat endpoint takes text prompts; use --prompt-format text")
    tokenizer = _load_tokenizer(args, model)
    factory = PromptFactory(tokenizer, seed=args.workload_seed)
    try:
        reqs = _build(args, factory, as_ids=args.prompt_format == "ids", max_total_len=args.max_model_len)
    except ValueError as e:
        _fail(str(e))
    temperature = 0.0 if args.temperature is None else args.temperature
    cfg = ClientConfig(base_url=args.base_url, endpoint=endpoint, model=model, temperature=temperature,
                       ignore_eos=_ignore_eos(args), include_usage=not args.no_usage, extra_body=extra_body,
                       headers=headers)
    print(f"bench serve: {len(reqs)} requests to {cfg.url} (model {model!r}), rates "
          f"{', '.join(fmt_rate(r) for r in rates)} req/s, burstiness {args.burstiness:g}, "
          f"max concurrency {args.max_concurrency or 'unlimited'}, prompts as "
          f"{args.prompt_format}{' sized with a tokenizer' if tokenizer is not None else ' (~1 token a word)'}")

    if not args.skip_test_request:
        first = reqs[0]
        probe = BenchRequest(first.prompt, first.prompt_len, min(first.output_len, 8))

        async def _probe():
            async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout, connect=30.0)) as client:
                return await send_request(client, cfg, probe)

        res = asyncio.run(_probe())
        if not res.success:
            _fail(f"the test request failed: {res.error}")

    # Each rate after the first gets fresh prompts of the same lengths: a server with a prefix cache
    # would otherwise answer the repeated prompts from it and the later rates would measure hits.
    # A workload file's prompts are what they are (and shared-prefix keeps its sharing within a rate).
    reqs_per_rate = [reqs if i == 0 or _workload_name(args) == "file" else
                     _build(args, PromptFactory(tokenizer, seed=[args.workload_seed, i]), as_ids=args.prompt_format == "ids",
                            max_total_len=args.max_model_len) for i in range(len(rates))]
    result = run_sweep(cfg, reqs_per_rate, rates, burstiness=args.burstiness, max_concurrency=args.max_concurrency,
                       seed=args.workload_seed, percentiles=percentiles, slos=slos, slo_target=args.slo_attainment,
                       request_timeout_s=args.request_timeout, progress=not args.disable_tqdm)
    if slos:
        g = result["goodput_rate"]
        print(f"Goodput (highest rate with >= {args.slo_attainment:.0%} of requests meeting "
              f"{', '.join(f'{k} <= {v:g} ms' for k, v in slos.items())}): "
              f"{'none of the rates tried' if g is None else fmt_rate(g) + ' req/s'}")
    result = {"benchmark": "serve", "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "label": args.label, "base_url": args.base_url, "endpoint": endpoint, "model": model,
              "prompt_format": args.prompt_format, "prompt_sizing": "tokenizer" if tokenizer is not None else "words",
              "request_rates": rates, "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
              "temperature": temperature, "percentiles": percentiles, "slos": slos,
              "workload": {**_workload_config(args), **workload_summary(reqs)}, "machine": _machine(), **result}
    json_path, png_path = default_result_paths(args.result_dir)
    json_path = Path(args.output_json) if args.output_json else json_path
    png_path = Path(args.plot) if args.plot else json_path.with_suffix(".png")
    write_json(json_path, result)
    print(f"wrote {json_path}")
    if not args.no_plot:
        try:
            from llmserve.bench.plot import plot_serve
        except ImportError:
            print("matplotlib is not installed: no plot (pip install matplotlib)")
            return
        try:
            plot_serve(result, png_path, title=f"{args.label or model} @ {cfg.url}")
            print(f"wrote {png_path}")
        except ImportError:
            print("matplotlib is not installed: no plot (pip install matplotlib)")


def add_bench_parser(subparsers) -> None:
    from llmserve.cli import add_engine_args

    bench = subparsers.add_parser("bench", help="benchmark the engine offline or any OpenAI-compatible server")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    tp = sub.add_parser("throughput", help="offline throughput: every request at once through the engine",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_engine_args(tp)
    _add_workload_args(tp, num_prompts=64)
    tp.add_argument("--warmup", type=int, default=1, help="untimed warm-up requests before the run")
    tp.add_argument("--output-json", default=None, help="write the results here")
    tp.set_defaults(func=_cmd_throughput)

    sv = sub.add_parser("serve", help="load an OpenAI-compatible server with timed arrivals; latency and goodput",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sv.add_argument("--base-url", default="http://127.0.0.1:8000")
    sv.add_argument("--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions")
    sv.add_argument("--model", default=None, help="the served model's name (unset: the first of /v1/models)")
    sv.add_argument("--tokenizer", default=None,
                    help="HF folder or GGUF file whose tokenizer sizes the prompts (unset: --model if it is a "
                         "local folder; else prompts are ~1 token a word)")
    sv.add_argument("--prompt-format", choices=["text", "ids"], default="text",
                    help="text works with any server; ids sends token ids (sized with llmserve's default model "
                         "unless --tokenizer is given)")
    sv.add_argument("--max-model-len", type=int, default=None, help="cap prompt + output tokens at this")
    _add_workload_args(sv, num_prompts=100)
    sv.add_argument("--request-rate", default="inf",
                    help="requests/s, or a comma-separated sweep (1,2,4); inf sends every request at once")
    sv.add_argument("--burstiness", type=float, default=1.0,
                    help="gamma shape of inter-arrival gaps: 1 Poisson, <1 burstier, >1 more regular")
    sv.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    sv.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                    help="SLOs for goodput and attainment, e.g. ttft:250 tpot:100 e2e:20000")
    sv.add_argument("--slo-attainment", type=float, default=0.9,
                    help="goodput rate = the highest rate at which this fraction of requests meets every SLO")
    sv.add_argument("--metric-percentiles", default="99", help="comma-separated percentiles to report")
    sv.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    sv.add_argument("--header", action="append", default=None, metavar="KEY=VALUE")
    sv.add_argument("--no-usage", action="store_true", help="do not ask for stream_options.include_usage")
    sv.add_argument("--request-timeout", type=float, default=600.0, help="seconds to wait for each chunk")
    sv.add_argument("--wait-for-server", type=float, default=0.0, help="wait up to this many seconds for /v1/models")
    sv.add_argument("--skip-test-request", action="store_true", help="do not send one short request first")
    sv.add_argument("--label", default=None)
    sv.add_argument("--result-dir", default="bench-results")
    sv.add_argument("--output-json", default=None, help="unset: RESULT_DIR/serve-<time>.json")
    sv.add_argument("--plot", default=None, help="PNG path (unset: next to the JSON)")
    sv.add_argument("--no-plot", action="store_true")
    sv.set_defaults(func=_cmd_serve)
