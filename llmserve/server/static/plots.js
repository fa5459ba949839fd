// Small canvas plots: a line over time and a histogram's buckets. No libraries.

const INK = "#2f6fde";
const AXIS = "#9a9aa6";

function prepare(canvas) {
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.font = "10px system-ui, sans-serif";
  return ctx;
}

// values: numbers, oldest first; drawn against a 0-based y axis with its maximum labelled.
export function drawLine(canvas, values) {
  const ctx = prepare(canvas);
  const { width, height } = canvas;
  const max = Math.max(1, ...values);
  ctx.fillStyle = AXIS;
  ctx.fillText(max.toFixed(max >= 10 ? 0 : 1), 2, 10);
  if (values.length < 2) return;
  ctx.strokeStyle = INK;
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  values.forEach((v, i) => {
    const x = (i / (values.length - 1)) * (width - 2) + 1;
    const y = height - 2 - (v / max) * (height - 14);
    if (i) ctx.lineTo(x, y);
    else ctx.moveTo(x, y);
  });
  ctx.stroke();
}

function seconds(s) {
  if (!Number.isFinite(s)) return "∞";
  return s < 1 ? `${Math.round(s * 1000)}ms` : `${s.toFixed(s < 10 ? 1 : 0)}s`;
}

// h: {bounds, counts} as prometheus.histogram returns it; buckets up to the last non-empty one.
export function drawHistogram(canvas, h) {
  const ctx = prepare(canvas);
  const { width, height } = canvas;
  let last = h.counts.length - 1;
  while (last > 0 && !h.counts[last]) last--;
  const shown = Math.max(4, last + 1);
  const counts = h.counts.slice(0, shown);
  const max = Math.max(1, ...counts);
  const barWidth = width / shown;
  ctx.fillStyle = INK;
  counts.forEach((c, i) => {
    const barHeight = (c / max) * (height - 16);
    ctx.fillRect(i * barWidth + 1, height - 12 - barHeight, Math.max(1, barWidth - 2), barHeight);
  });
  ctx.fillStyle = AXIS;
  if (h.bounds.length) {
    ctx.fillText("0", 1, height - 1);
    const end = `≤${seconds(h.bounds[Math.min(shown, h.bounds.length) - 1])}`;
    ctx.fillText(end, width - ctx.measureText(end).width - 1, height - 1);
  }
}

export { seconds };
