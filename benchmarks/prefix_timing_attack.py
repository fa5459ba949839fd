"""Can one user tell, by timing, whether another user's prompt prefix is in the prefix cache?

    .venv/bin/python benchmarks/prefix_timing_attack.py [--trials 200]

Each trial: with probability 1/2 a victim sends a secret 256-token prompt; then the attacker sends
its guess of that prompt (with a different last token, as a guess would differ) and times the
answer's first token. A hit in a shared prefix cache makes the attacker's prefill short. The
attacker calibrates a threshold (between the medians) on its own first 30 trials (knowing the truth there), then guesses
on the rest; accuracy is the share of right guesses: near 1 means the cache leaks, near 0.5 that
it does not. Private mode off (a shared cache) and on (salt-less requests isolated, blocks wiped)
run side by side on the embedded model.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from llmserve import LLM, SamplingParams


def attack(private: bool, trials: int, seed: int) -> dict:
    llm = LLM(private=private, max_model_len=1024)
    rng = random.Random(seed)
    vocab = llm.engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    samples: list[tuple[bool, float]] = []
    for _ in range(trials):
        secret = [rng.randrange(100, vocab) for _ in range(256)]
        present = rng.random() < 0.5
        if present:
            llm.generate([secret], params, use_tqdm=False)
        guess = secret[:-1] + [rng.randrange(100, vocab)]
        start = time.perf_counter()
        llm.generate([guess], params, use_tqdm=False)
        samples.append((present, time.perf_counter() - start))
    calib, rest = samples[:30], samples[30:]
    hit = statistics.median([t for p, t in calib if p] or [0.0])
    miss = statistics.median([t for p, t in calib if not p] or [0.0])
    threshold = (hit + miss) / 2
    right = sum((t < threshold) == p for p, t in rest)
    return {"private": private, "trials": len(rest), "accuracy": right / len(rest),
            "median_s_when_present": hit, "median_s_when_absent": miss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for private in (False, True):
        r = attack(private, args.trials, args.seed)
        print(f"private={r['private']}: accuracy {r['accuracy']:.2f} over {r['trials']} guesses "
              f"(median first token {r['median_s_when_present'] * 1e3:.0f} ms after the victim, "
              f"{r['median_s_when_absent'] * 1e3:.0f} ms without)")


if __name__ == "__main__":
    main()
