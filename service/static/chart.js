// The loss chart: training loss by step (a line) and held-out loss at each epoch end (dots), drawn as SVG.
// Only attributes and classes are set (no inline style), so it works under the dashboard's Content-Security-Policy.

const NS = "http://www.w3.org/2000/svg";
const W = 640;
const H = 300;
const M = { left: 52, right: 16, top: 28, bottom: 36 };

function el(name, attrs = {}, text) {
  const node = document.createElementNS(NS, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function niceTicks(lo, hi, count) {
  const span = hi - lo || Math.abs(hi) || 1;
  const raw = span / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => span / s <= count) || raw;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

function fmt(v) {
  if (v === 0) return "0";
  if (Math.abs(v) >= 1000) return `${Math.round(v / 100) / 10}k`;
  return Number(v.toPrecision(3)).toString();
}

/**
 * Draw ``metrics`` (the body of GET /jobs/{id}/metrics) into ``container``, replacing what was there.
 * Points are [step, loss]; eval losses may be null (no held-out split) and are left out.
 */
export function drawLossChart(container, metrics) {
  const train = (metrics.train_loss || []).filter(([, v]) => Number.isFinite(v));
  const evals = (metrics.eval_loss || []).filter(([, v]) => v !== null && Number.isFinite(v));
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-labelledby": "loss-svg-title loss-svg-desc" });
  svg.append(el("title", { id: "loss-svg-title" }, "Loss by training step"));
  const last = train.length ? train[train.length - 1] : null;
  const lastEval = evals.length ? evals[evals.length - 1] : null;
  const desc = train.length
    ? `${train.length} training-loss point${train.length === 1 ? "" : "s"} up to step ${last[0]}, latest ${fmt(last[1])}` +
      (lastEval ? `; held-out loss ${fmt(lastEval[1])} at step ${lastEval[0]}` : "")
    : "no loss recorded yet";
  svg.append(el("desc", { id: "loss-svg-desc" }, desc));

  if (!train.length && !evals.length) {
    svg.append(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "No loss yet: the chart starts with the first training step."));
    container.replaceChildren(svg);
    return desc;
  }

  const all = [...train, ...evals];
  const maxStep = Math.max(metrics.total_steps || 0, ...all.map(([s]) => s), 1);
  let lo = Math.min(...all.map(([, v]) => v));
  let hi = Math.max(...all.map(([, v]) => v));
  if (hi - lo < 1e-9) {
    lo -= 0.5;
    hi += 0.5;
  }
  const pad = (hi - lo) * 0.06;
  lo = Math.max(0, lo - pad);
  hi += pad;
  const x = (s) => M.left + (s / maxStep) * (W - M.left - M.right);
  const y = (v) => H - M.bottom - ((v - lo) / (hi - lo)) * (H - M.top - M.bottom);

  for (const t of niceTicks(lo, hi, 5)) {
    if (t < lo || t > hi) continue;
    svg.append(el("line", { x1: M.left, x2: W - M.right, y1: y(t), y2: y(t), class: "grid-line" }));
    svg.append(el("text", { x: M.left - 6, y: y(t) + 4, "text-anchor": "end", class: "tick" }, fmt(t)));
  }
  for (const t of niceTicks(0, maxStep, 6)) {
    if (t > maxStep) continue;
    svg.append(el("text", { x: x(t), y: H - M.bottom + 16, "text-anchor": "middle", class: "tick" }, fmt(t)));
  }
  svg.append(el("line", { x1: M.left, x2: M.left, y1: M.top, y2: H - M.bottom, class: "axis" }));
  svg.append(el("line", { x1: M.left, x2: W - M.right, y1: H - M.bottom, y2: H - M.bottom, class: "axis" }));
  svg.append(el("text", { x: W - M.right, y: H - 4, "text-anchor": "end", class: "tick" }, "step"));

  if (train.length) {
    const d = train.map(([s, v], i) => `${i ? "L" : "M"}${x(s).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    svg.append(el("path", { d, class: "train", "data-points": train.length, id: "loss-train-path" }));
    if (train.length === 1) { // a path of one point draws nothing: a job of one step gets a dot
      const [s, v] = train[0];
      const dot = el("circle", { cx: x(s), cy: y(v), r: 4, class: "train-dot", id: "loss-train-dot" });
      dot.append(el("title", {}, `training loss ${fmt(v)} at step ${s}`));
      svg.append(dot);
    }
  }
  if (evals.length) {
    if (evals.length > 1) {
      const d = evals.map(([s, v], i) => `${i ? "L" : "M"}${x(s).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
      svg.append(el("path", { d, class: "eval", "data-points": evals.length, id: "loss-eval-path" }));
    }
    for (const [s, v] of evals) {
      const dot = el("circle", { cx: x(s), cy: y(v), r: 4, class: "eval-dot" });
      dot.append(el("title", {}, `held-out loss ${fmt(v)} at step ${s}`));
      svg.append(dot);
    }
  }
  // Legend
  const lx = M.left + 10;
  svg.append(el("line", { x1: lx, x2: lx + 22, y1: 14, y2: 14, class: "train" }));
  svg.append(el("text", { x: lx + 28, y: 18, class: "legend" }, "training loss"));
  svg.append(el("circle", { cx: lx + 140, cy: 14, r: 4, class: "legend-dot" }));
  svg.append(el("text", { x: lx + 150, y: 18, class: "legend" }, "held-out loss (epoch end)"));
  container.replaceChildren(svg);
  return desc;
}
