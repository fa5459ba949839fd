"""`llmserve generate | chat | serve | bench`."""
from __future__ import annotations

import argparse
import logging
import sys

from llmserve.config import ACTIVATIONS, KV_CACHE_DTYPES, QUANTIZATIONS
from llmserve.engine.kv_policy import KV_POLICIES
from llmserve.errors import LLMServeError


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine flags shared by every subcommand, named as `vllm serve` names them."""
    p.add_argument("--model", dest="model_flag", default=None, help="HF model folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--quantization", default="auto", choices=list(QUANTIZATIONS),
                   help="linear weight storage (CPU; compute stays float32). auto: keep a GGUF model's own "
                        "Q4_1/Q8_0 blocks where they are exact, else float; none: float; int8 (per-row "
                        "scales), bf16, q4_1, q8_0: every layer in that format (lossy)")
    p.add_argument("--activations", default="float32", choices=list(ACTIVATIONS),
                   help="activations of the GGUF Q4_1/Q8_0 layers (CPU). float32: exact; q8: quantized to "
                        "8 bits per block of 32 with integer dot products, as llama.cpp computes them "
                        "(faster, lossy; needs GGUF layers, e.g. --quantization auto on a GGUF model)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                   help="what the KV cache stores. auto: the model's dtype (exact); float16 or bfloat16 under "
                        "float32 compute: half the KV memory and decode reads (lossy, as llama.cpp's f16 cache)")
    p.add_argument("--kv-groups", action=argparse.BooleanOptionalAction, default=True,
                   help="layers of each kind in their own KV groups, so sliding-window layers hold only their "
                        "window per request; --no-kv-groups keeps every token for every layer")
    p.add_argument("--replicas", type=int, default=1,
                   help="engines on Ray (local, loopback only, unless --ray-address), each with its share of the threads")
    p.add_argument("--router", default="round_robin",
                   choices=["round_robin", "least_load", "power_of_two", "prefix_affinity"],
                   help="how requests are placed among replicas (identity-free)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one")
    p.add_argument("--prefill-replicas", type=int, default=0,
                   help="disaggregated serving: replicas that compute prompts (with --decode-replicas)")
    p.add_argument("--decode-replicas", type=int, default=0,
                   help="disaggregated serving: replicas that continue requests, their KV moved from prefill")
    p.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                   help="SLO-driven replica count between MIN and MAX (with --ttft-slo and --tpot-slo): out when "
                        "queued or running requests are predicted to miss an SLO, in with hysteresis")
    p.add_argument("--tpot-slo", type=float, default=None, help="seconds per output token; the autoscaler's target")
    p.add_argument("--upscale-delay", type=float, default=5.0,
                   help="seconds over which the autoscaler's predictions, averaged, must miss an SLO to scale out")
    p.add_argument("--downscale-delay", type=float, default=30.0,
                   help="seconds one replica fewer must be predicted to hold both SLOs before scaling in")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="per-step token budget (default: 512 on CPU, 2048 on CUDA)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--kv-cache-memory", type=int, default=None, help="KV cache budget in bytes")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority", "deadline"])
    p.add_argument("--wipe-kv-on-free", action="store_true")
    p.add_argument("--ttft-slo", type=float, default=None, help="seconds; the autoscaler's TTFT target, and the default TTFT deadline under "
                        "--scheduling-policy deadline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative-config", default=None,
                   help='speculative decoding, as JSON (vLLM\'s shape): {"method": "ngram" | "self_quantized" | '
                        '"self_early_exit" | "draft_model", "num_speculative_tokens": 4, ...}; off by default')
    p.add_argument("--kv-policy", default="full", choices=list(KV_POLICIES),
                   help="which tokens' K/V requests keep unless they name a policy: full (exact), or a lossy "
                        "one that keeps --kv-budget tokens: streaming (sinks + recent), h2o, keyformer")
    p.add_argument("--kv-offload-dir", default=None,
                   help="a disk tier under the prefix cache: evicted prefix blocks go to a fresh subdirectory "
                        "of this one (removed at shutdown) and are read back on a hit instead of recomputed")
    p.add_argument("--kv-offload-gb", type=float, default=4.0, help="the disk tier's size bound, in GiB")
    p.add_argument("--kv-budget", type=_kv_budget, default=None,
                   help="the lossy policies' budget: a token count (e.g. 512) or a fraction of each request's "
                        "length (e.g. 0.5)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        model=getattr(args, "model", None) or args.model_flag, dtype=args.dtype, device=args.device,
        quantization=args.quantization, activations=getattr(args, "activations", "float32"),
        kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"), kv_groups=getattr(args, "kv_groups", True),
        replicas=getattr(args, "replicas", 1), router=getattr(args, "router", "round_robin"),
        ray_address=getattr(args, "ray_address", None),
        prefill_replicas=getattr(args, "prefill_replicas", 0), decode_replicas=getattr(args, "decode_replicas", 0),
        autoscale=getattr(args, "autoscale", None), tpot_slo=getattr(args, "tpot_slo", None),
        upscale_delay_s=getattr(args, "upscale_delay", 5.0), downscale_delay_s=getattr(args, "downscale_delay", 30.0),
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, kv_cache_memory=args.kv_cache_memory,
        enable_prefix_caching=args.enable_prefix_caching, scheduling_policy=args.scheduling_policy,
        wipe_kv_on_free=args.wipe_kv_on_free, ttft_slo=args.ttft_slo, seed=args.seed,
        speculative_config=getattr(args, "speculative_config", None),
        kv_policy=getattr(args, "kv_policy", "full"), kv_budget=getattr(args, "kv_budget", None),
        kv_offload_dir=getattr(args, "kv_offload_dir", None),
        kv_offload_bytes=int(getattr(args, "kv_offload_gb", 4.0) * (1 << 30)))


def _kv_budget(text: str) -> int | float:
    """A token count ("512") or a fraction ("0.5")."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError("a token count or a fraction in (0, 1]") from None


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--sampling-seed", type=int, default=None)


def _sampling(args: argparse.Namespace):
    from llmserve.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.sampling_seed)


def _cmd_generate(args: argparse.Namespace) -> None:
    from llmserve.entrypoints.llm import LLM

    llm = LLM(**engine_kwargs(args))
    for out in llm.generate(args.prompt, _sampling(args), use_tqdm=False):
        print(out.outputs[0].text)


def _cmd_chat(args: argparse.Namespace) -> None:
    from llmserve.entrypoints.llm import LLM

    if getattr(args, "private", None):  # a remote private node, verified first
        from llmserve.privacy.cli import private_chat
        return private_chat(args)

    llm = LLM(**engine_kwargs(args))
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.question}]
    for out in llm.chat(messages, _sampling(args), use_tqdm=False):
        print(out.outputs[0].text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmserve", description="Serve and run LLMs.")
    parser.add_argument("--log-level", default=None, help="default: INFO for serve, WARNING otherwise")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete a prompt")
    gen.add_argument("prompt")
    add_engine_args(gen)
    _add_sampling_args(gen)
    gen.set_defaults(func=_cmd_generate)

    chat = sub.add_parser("chat", help="answer a question with the model's chat template")
    chat.add_argument("question")
    chat.add_argument("--system", default=None)
    add_engine_args(chat)
    _add_sampling_args(chat)
    chat.set_defaults(func=_cmd_chat)
    try:
        from llmserve.privacy.cli import add_privacy_parsers, add_private_chat_args
        add_private_chat_args(chat)
        add_privacy_parsers(sub)
    except ImportError:  # the privacy dependencies (pyhpke, model-signing) are not installed
        pass

    try:
        from llmserve.server.cli import add_serve_parser
        add_serve_parser(sub)
    except ImportError:
        pass
    try:
        from llmserve.bench.cli import add_bench_parser
        add_bench_parser(sub)
    except ImportError:
        pass
    from llmserve.cluster.plan_cli import add_plan_parser
    add_plan_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    level = args.log_level or ("INFO" if args.command == "serve" else "WARNING")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except LLMServeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
