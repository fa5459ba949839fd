// The live panel of the server's state: polls /metrics (open, no key needed) and shows the
// engine's gauges, tokens/s from the generated-tokens counter, and the TTFT and per-token latency
// histograms.
import { drawHistogram, drawLine, seconds } from "./plots.js";
import { histogram, parseMetrics, quantile, total } from "./prometheus.js";

const HISTORY = 60; // points of tokens/s kept for the plot

export class ServerPanel {
  constructor(root, intervalMs = 1000) {
    this.root = root;
    this.intervalMs = intervalMs;
    this.previous = null; // {time, generated}
    this.rates = [];
    this.timer = null;
  }

  $(id) {
    return this.root.querySelector(`#${id}`);
  }

  start() {
    const tick = async () => {
      await this.poll();
      this.timer = setTimeout(tick, this.intervalMs);
    };
    tick();
  }

  async poll() {
    let text;
    try {
      const r = await fetch("/metrics", { cache: "no-store" });
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      text = await r.text();
    } catch (e) {
      this.$("m-updated").textContent = "(unreachable)";
      return;
    }
    this.show(parseMetrics(text), performance.now());
  }

  show(samples, now) {
    const gauge = (name) => total(samples, `llmserve:${name}`);
    this.$("m-running").textContent = gauge("num_requests_running") ?? "–";
    this.$("m-waiting").textContent = gauge("num_requests_waiting") ?? "–";
    const kv = gauge("kv_cache_usage_perc") ?? 0;
    this.$("m-kv").value = kv;
    this.$("m-kv-text").textContent = `${(kv * 100).toFixed(1)}%`;

    const generated = gauge("generation_tokens_total") ?? 0;
    this.$("m-generated").textContent = `${generated} tokens`;
    this.$("m-finished").textContent = `${gauge("request_success_total") ?? 0} completions`;
    if (this.previous !== null) {
      const dt = (now - this.previous.time) / 1000;
      const rate = dt > 0 ? Math.max(0, generated - this.previous.generated) / dt : 0;
      this.rates.push(rate);
      if (this.rates.length > HISTORY) this.rates.shift();
      this.$("m-tps").textContent = rate.toFixed(1);
    }
    this.previous = { time: now, generated };
    drawLine(this.$("plot-tps"), this.rates);

    this.showHistogram(samples, "llmserve:time_to_first_token_seconds", "plot-ttft", "ttft-summary");
    this.showHistogram(samples, "llmserve:inter_token_latency_seconds", "plot-tpot", "tpot-summary");
    this.$("m-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  }

  showHistogram(samples, base, canvasId, summaryId) {
    const h = histogram(samples, base);
    drawHistogram(this.$(canvasId), h);
    const p50 = quantile(h, 0.5);
    const p90 = quantile(h, 0.9);
    this.$(summaryId).textContent = h.count
      ? `n=${h.count} p50 ${seconds(p50)} p90 ${seconds(p90)}`
      : "n=0";
  }
}
