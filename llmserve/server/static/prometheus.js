// The Prometheus text exposition format, parsed into samples, and the few summaries the page needs.

const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

function parseValue(text) {
  if (text === "+Inf" || text === "Inf") return Infinity;
  if (text === "-Inf") return -Infinity;
  return Number(text); // "NaN" parses to NaN
}

function unescapeLabel(value) {
  return value.replace(/\\(["\\n])/g, (_, c) => (c === "n" ? "\n" : c));
}

// [{name, labels, value}] for every sample line; comments (# HELP, # TYPE) are skipped.
export function parseMetrics(text) {
  const samples = [];
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const m = SAMPLE.exec(line);
    if (!m) continue;
    const labels = {};
    for (const [, key, value] of (m[2] || "").matchAll(LABEL)) labels[key] = unescapeLabel(value);
    samples.push({ name: m[1], labels, value: parseValue(m[3]) });
  }
  return samples;
}

// The sum of the samples called `name` (over every label set, e.g. every model).
export function total(samples, name) {
  let sum = 0;
  let seen = false;
  for (const s of samples) {
    if (s.name === name && Number.isFinite(s.value)) {
      sum += s.value;
      seen = true;
    }
  }
  return seen ? sum : null;
}

// A histogram `base` as {bounds, counts (per bucket, not cumulative), count, sum}, label sets summed.
export function histogram(samples, base) {
  const cumulative = new Map();
  for (const s of samples) {
    if (s.name !== `${base}_bucket`) continue;
    const le = parseValue(s.labels.le);
    cumulative.set(le, (cumulative.get(le) || 0) + s.value);
  }
  const bounds = [...cumulative.keys()].sort((a, b) => a - b);
  const counts = bounds.map((le, i) => cumulative.get(le) - (i ? cumulative.get(bounds[i - 1]) : 0));
  return { bounds, counts, count: total(samples, `${base}_count`) || 0, sum: total(samples, `${base}_sum`) || 0 };
}

// The q-quantile estimated as Prometheus' histogram_quantile does: linear within the bucket.
export function quantile(h, q) {
  if (!h.count) return null;
  const rank = q * h.count;
  let seen = 0;
  for (let i = 0; i < h.bounds.length; i++) {
    if (seen + h.counts[i] >= rank && h.counts[i] > 0) {
      const lower = i ? h.bounds[i - 1] : 0;
      const upper = h.bounds[i];
      if (!Number.isFinite(upper)) return lower;
      return lower + (upper - lower) * ((rank - seen) / h.counts[i]);
    }
    seen += h.counts[i];
  }
  return null;
}
