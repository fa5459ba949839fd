"""KV policies against full KV: perplexity of a real text, and greedy agreement, on the embedded model.

    .venv/bin/python benchmarks/kv_policy_quality.py [--context 2048] [--budgets 0.2,0.5,0.8]

Perplexity: the text (Debian's /usr/share/common-licenses files, fixed, written by no one here) is
cut into windows of --context tokens; each window is teacher-forced through the engine one token
per step from its first --prompt tokens, so every policy evicts exactly as it does while generating
(the sampler is replaced by one that returns the text's next token and records its logprob from
the model's logits). Scored on the window's positions after --prompt; each policy at each budget
(a fraction of the length so far) against `full` in the same run.

Agreement: greedy continuations (--gen tokens) of the start of each license under each policy,
the share of positions equal to `full`'s before the first difference.
Results: bench-results/kv_policy_quality.json.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from llmserve.entrypoints.llm import LLM
from llmserve.sampling.sampler import SamplerOutput
from llmserve.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["GPL-3", "LGPL-3", "MPL-2.0", "Apache-2.0"]


class ForcedSampler:
    """Stands in for the runner's sampler: returns the text's next token and records its logprob."""

    def __init__(self, inner, targets: list[int]) -> None:
        self.inner, self.targets, self.logprobs = inner, targets, []

    def __call__(self, logits: torch.Tensor, meta) -> SamplerOutput:
        assert logits.shape[0] == 1, "one request at a time"
        token = self.targets[len(self.logprobs)]
        self.logprobs.append(float(torch.log_softmax(logits[0].double(), -1)[token]))
        return SamplerOutput(token_ids=torch.tensor([token]))


def forced_nll(llm: LLM, window: list[int], prompt: int, policy: str, budget: float | None) -> list[float]:
    engine = llm.engine
    runner = engine.runner
    forced = ForcedSampler(runner.sampler, window[prompt:])
    runner.sampler = forced
    try:
        params = SamplingParams(temperature=0, max_tokens=len(window) - prompt, ignore_eos=True,
                                kv_policy=policy, kv_budget=budget, seed=0)
        engine.add_request("w", window[:prompt], params)
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        runner.sampler = forced.inner
    return [-lp for lp in forced.logprobs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--prompt", type=int, default=64, help="tokens each window starts from (not scored)")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--budgets", default="0.2,0.5,0.8")
    ap.add_argument("--policies", default="streaming,h2o,keyformer")
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--json", default=str(ROOT / "bench-results" / "kv_policy_quality.json"))
    args = ap.parse_args()

    llm = LLM(max_model_len=args.context + 8, enable_prefix_caching=False)
    tok = llm.engine.tokenizer
    texts = {name: Path("/usr/share/common-licenses", name).read_text() for name in TEXTS}
    ids = tok.encode(texts["GPL-3"])
    windows = [ids[i * args.context:(i + 1) * args.context] for i in range(args.windows)]
    windows = [w for w in windows if len(w) == args.context]
    budgets = [float(b) for b in args.budgets.split(",")]
    policies = args.policies.split(",")
    print(f"text GPL-3: {len(ids)} tokens; {len(windows)} windows of {args.context}, scored after {args.prompt}")

    results: dict = {"context": args.context, "prompt": args.prompt, "windows": len(windows), "perplexity": {},
                     "agreement": {}}
    configs = [("full", None)] + [(p, b) for p in policies for b in budgets]
    for policy, budget in configs:
        start = time.perf_counter()
        nll = [x for w in windows for x in forced_nll(llm, w, args.prompt, policy, budget)]
        ppl = math.exp(sum(nll) / len(nll))
        key = policy if budget is None else f"{policy}@{budget}"
        results["perplexity"][key] = ppl
        print(f"  perplexity {key:>16}: {ppl:8.3f}   ({time.perf_counter() - start:.0f} s)", flush=True)

    prompts = [tok.encode(texts[name])[:256] for name in TEXTS]
    gen = SamplingParams(temperature=0, max_tokens=args.gen, ignore_eos=True)
    full = [o.outputs[0].token_ids for o in llm.generate(prompts, gen, use_tqdm=False)]
    for policy, budget in configs[1:]:
        lossy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.gen, ignore_eos=True,
                                                     kv_policy=policy, kv_budget=budget, seed=0), use_tqdm=False)
        same = []
        for f, o in zip(full, lossy):
            t = o.outputs[0].token_ids
            first_diff = next((i for i, (a, b) in enumerate(zip(f, t)) if a != b), len(f))
            same.append(first_diff / len(f))
        key = f"{policy}@{budget}"
        results["agreement"][key] = sum(same) / len(same)
        print(f"  greedy agreement {key:>16}: {results['agreement'][key]:.2f} of {args.gen} tokens before "
              "the first difference (mean over 4 texts)", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
