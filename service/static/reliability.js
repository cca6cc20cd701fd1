// The reliability diagram of a job's evaluation: for each of 10 equal-width bins of the top label's probability, the
// mean confidence (x) against the share answered right (y), for the base model and the adapter, the adapter also after
// calibration (cross-fitted). Points on the diagonal are calibrated; below it over-confident, above it timid. A point's
// area follows the number of items in its bin. SVG with attributes and classes only (the page's CSP allows no inline
// style).

const NS = "http://www.w3.org/2000/svg";
const S = 300; // the plot's side
const M = { left: 44, right: 12, top: 12, bottom: 40 };
const W = M.left + S + M.right;
const H = M.top + S + M.bottom;

function el(name, attrs = {}, text) {
  const node = document.createElementNS(NS, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

const x = (v) => M.left + v * S;
const y = (v) => M.top + (1 - v) * S;
const pct = (v) => `${(v * 100).toFixed(1)}%`;

/** The series drawn: [css class, legend, bins, ECE]; bins of one series are its non-empty ones. */
function series(metrics) {
  const out = [];
  const add = (cls, legend, figures) => {
    const bins = (figures?.reliability || []).filter((b) => b.count > 0);
    if (bins.length) out.push([cls, legend, bins, figures.ece]);
  };
  add("rel-base", "base model", metrics.base);
  add("rel-adapter", "adapter", metrics.adapter);
  add("rel-calibrated", "adapter, calibrated", metrics.adapter?.calibrated);
  return out;
}

/** An SVG element: the reliability diagram of ``metrics`` (the evaluation in GET /adapters/{name}), or null when the
 * evaluation has no probability figures (an adapter trained before they were reported). */
export function reliabilityDiagram(metrics) {
  const drawn = series(metrics);
  if (!drawn.length) return null;
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-labelledby": "rel-title rel-desc", class: "reliability" });
  svg.append(el("title", { id: "rel-title" }, "Reliability diagram: confidence against accuracy"));
  svg.append(el("desc", { id: "rel-desc" }, drawn.map(([, legend, bins, ece]) =>
    `${legend}: ECE ${ece === undefined ? "–" : ece.toFixed(3)} over ${bins.reduce((n, b) => n + b.count, 0)} items`).join("; ")));
  for (let t = 0; t <= 1.0001; t += 0.2) {
    svg.append(el("line", { x1: x(0), x2: x(1), y1: y(t), y2: y(t), class: "grid-line" }));
    svg.append(el("text", { x: M.left - 6, y: y(t) + 4, "text-anchor": "end", class: "tick" }, t.toFixed(1)));
    svg.append(el("text", { x: x(t), y: M.top + S + 15, "text-anchor": "middle", class: "tick" }, t.toFixed(1)));
  }
  svg.append(el("line", { x1: x(0), y1: y(0), x2: x(1), y2: y(1), class: "diagonal" }));
  svg.append(el("text", { x: x(0.5), y: H - 6, "text-anchor": "middle", class: "tick" }, "confidence (top label)"));
  svg.append(el("text", { x: 12, y: y(0.5), "text-anchor": "middle", class: "tick", transform: `rotate(-90 12 ${y(0.5)})` }, "accuracy"));
  const total = Math.max(...drawn.map(([, , bins]) => bins.reduce((n, b) => n + b.count, 0)));
  for (const [cls, legend, bins] of drawn) {
    const d = bins.map((b, i) => `${i ? "L" : "M"}${x(b.confidence).toFixed(1)},${y(b.accuracy).toFixed(1)}`).join(" ");
    svg.append(el("path", { d, class: `rel-line ${cls}` }));
    for (const b of bins) {
      const r = 2.5 + 7 * Math.sqrt(b.count / total);
      const dot = el("circle", { cx: x(b.confidence), cy: y(b.accuracy), r: r.toFixed(1), class: `rel-dot ${cls}`, "data-count": b.count });
      dot.append(el("title", {}, `${legend}: ${b.count} items with confidence ${pct(b.lower)}–${pct(b.upper)}: ` +
        `mean confidence ${pct(b.confidence)}, accuracy ${pct(b.accuracy)}`));
      svg.append(dot);
    }
  }
  drawn.forEach(([cls, legend, , ece], i) => { // bottom right: confident and wrong, the corner a sane model leaves empty
    const ly = y(0) - 10 - (drawn.length - 1 - i) * 16;
    svg.append(el("circle", { cx: x(0.4), cy: ly - 4, r: 4, class: `rel-dot ${cls}` }));
    svg.append(el("text", { x: x(0.4) + 9, y: ly, class: "legend" }, `${legend} (ECE ${ece === undefined ? "–" : ece.toFixed(3)})`));
  });
  return svg;
}
