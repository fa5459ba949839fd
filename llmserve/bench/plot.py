"""The serving benchmark's PNG: latency CDFs per rate and, for a sweep, throughput and SLO attainment
against the request rate. matplotlib is imported here only, so the rest runs without it."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from llmserve.bench.metrics import fmt_rate

_CDFS = (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("itl_ms", "ITL (ms)"), ("e2el_ms", "E2E latency (ms)"))


def _values(run: dict, key: str) -> np.ndarray:
    ok = [r for r in run["requests"] if r["success"]]
    if key == "itl_ms":
        vals = [x for r in ok for x in r["itl_ms"]]
    else:
        vals = [r[key] for r in ok if r[key] is not None]
    return np.sort(np.asarray(vals, dtype=np.float64))


def plot_serve(result: dict, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    sweep = len(runs) > 1
    slos = result.get("slos") or {}
    nrows = 2 if sweep else 1
    fig, axes = plt.subplots(nrows, 4, figsize=(18, 4.2 * nrows), squeeze=False)
    for ax, (key, label) in zip(axes[0], _CDFS):
        for run in runs:
            vals = _values(run, key)
            if len(vals):
                ax.step(vals, np.arange(1, len(vals) + 1) / len(vals), where="post",
                        label=f"{fmt_rate(run['request_rate'])} req/s")
        slo = {"ttft_ms": slos.get("ttft"), "tpot_ms": slos.get("tpot"), "e2el_ms": slos.get("e2el")}.get(key)
        if slo:
            ax.axvline(slo, color="red", linestyle="--", linewidth=1, label=f"SLO {slo:g} ms")
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests" if key != "itl_ms" else "fraction of gaps")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if sweep:
        x = np.arange(len(runs))
        labels = [fmt_rate(r["request_rate"]) for r in runs]
        m = [r["metrics"] for r in runs]
        panels = [
            ("output tokens/s", [[v["output_throughput"] for v in m]], ["output"]),
            ("requests/s", [[v["request_throughput"] for v in m]]
             + ([[v["request_goodput"] for v in m]] if "request_goodput" in m[0] else []),
             ["throughput", "goodput"]),
            ("latency (ms)", [[v["median_ttft_ms"] for v in m], [v["p99_ttft_ms"] if "p99_ttft_ms" in v else
                                                                 v["mean_ttft_ms"] for v in m],
                              [v["median_tpot_ms"] for v in m]],
             ["median TTFT", "p99 TTFT" if "p99_ttft_ms" in m[0] else "mean TTFT", "median TPOT"]),
        ]
        if "slo_attainment" in m[0]:
            panels.append(("SLO attainment", [[v["slo_attainment"] for v in m]], ["attainment"]))
        for ax, (ylabel, series, names) in zip(axes[1], panels):
            for ys, name in zip(series, names):
                ax.plot(x, ys, marker="o", label=name)
            if ylabel == "SLO attainment":
                target = result.get("slo_target", 0.9)
                ax.axhline(target, color="red", linestyle="--", linewidth=1, label=f"target {target:.0%}")
                ax.set_ylim(0, 1.05)
            ax.set_xticks(x, labels)
            ax.set_xlabel("request rate (req/s)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in axes[1][len(panels):]:
            ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
