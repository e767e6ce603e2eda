// llama-lora dashboard: small SVG line charts (no library). A chart is drawn again whole whenever its data
// grows: runs log at most a few records a second, so redrawing a few hundred points is cheap.
(function () {
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const PALETTE = ["#1f5fa8", "#c2571a", "#2e7d32", "#7b3fa0", "#a8123e", "#00727a", "#6b5a00", "#444"];

function el(name, attrs, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

function niceTicks(lo, hi, count) {
  if (!(hi > lo)) { hi = lo + 1; lo = lo - 1; }
  const span = hi - lo, raw = span / Math.max(count, 1);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => span / s <= count) || 10 * mag;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
  return ticks;
}

function fmt(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "-";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
  return (+v.toPrecision(4)).toString();
}

// Exponential moving average with TensorBoard's debiasing: the first points are not pulled towards zero.
function smooth(points, weight) {
  let last = 0, n = 0;
  return points.map(([x, y]) => {
    last = last * weight + (1 - weight) * y;
    n += 1;
    return [x, last / (1 - Math.pow(weight, n))];
  });
}

// series: [{name, points: [[x, y]...], color?, dashed?, thin?, dots?}]
function lineChart(container, title, series, opts) {
  opts = opts || {};
  const W = 420, H = 230, L = 56, R = 12, T = 26, B = 34;
  container.textContent = "";
  const drawn = series.filter((s) => s.points.length);
  const all = drawn.flatMap((s) => s.points).filter((p) => Number.isFinite(p[1]));
  const total = drawn.reduce((n, s) => n + s.points.length, 0);
  const figure = document.createElement("figure");
  figure.className = "chart";
  figure.dataset.points = String(total);
  figure.dataset.title = title;
  container.appendChild(figure);
  const svg = el("svg", {
    viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": `${title}: ${drawn.map((s) => `${s.name}, ${s.points.length} points, last ${fmt(s.points[s.points.length - 1][1])}`).join("; ") || "no data yet"}`,
  }, figure);
  el("text", { x: L, y: 16, class: "chart-title" }, svg).textContent = title;
  if (!all.length) {
    el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "chart-empty" }, svg).textContent = "no data yet";
    return figure;
  }
  let x0 = Math.min(...all.map((p) => p[0])), x1 = Math.max(...all.map((p) => p[0]));
  let y0 = Math.min(...all.map((p) => p[1])), y1 = Math.max(...all.map((p) => p[1]));
  if (x1 === x0) { x1 = x0 + 1; }
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.05 || 1; y1 += Math.abs(y1) * 0.05 || 1; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const axis = el("g", { class: "axis" }, svg);
  for (const t of niceTicks(y0, y1, 4)) {
    el("line", { x1: L, x2: W - R, y1: sy(t), y2: sy(t), class: "grid" }, axis);
    el("text", { x: L - 6, y: sy(t) + 4, "text-anchor": "end" }, axis).textContent = fmt(t);
  }
  for (const t of niceTicks(x0, x1, 5)) {
    el("text", { x: sx(t), y: H - B + 16, "text-anchor": "middle" }, axis).textContent = fmt(t);
  }
  el("text", { x: W - R, y: H - 4, "text-anchor": "end" }, axis).textContent = opts.xLabel || "step";
  drawn.forEach((s, i) => {
    const color = s.color || PALETTE[i % PALETTE.length];
    const pts = s.points.filter((p) => Number.isFinite(p[1]));
    const d = pts.map((p, j) => `${j ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
    el("path", {
      d, fill: "none", stroke: color, "stroke-width": s.thin ? 1 : 2,
      "stroke-opacity": s.thin ? 0.35 : 1, "stroke-dasharray": s.dashed ? "5 3" : "none", class: "series",
      "data-series": s.name, "data-count": String(s.points.length),
    }, svg);
    if (s.dots || pts.length === 1) {
      for (const p of pts) el("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 3, fill: color }, svg);
    }
  });
  const legend = document.createElement("ul");
  legend.className = "legend";
  drawn.forEach((s, i) => {
    const li = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch" + (s.dashed ? " dashed" : "");
    swatch.style.borderColor = s.color || PALETTE[i % PALETTE.length];
    li.append(swatch, `${s.name} ${fmt(s.points[s.points.length - 1][1])}`);
    legend.appendChild(li);
  });
  figure.appendChild(legend);
  hover(svg, drawn, sx, x0, x1, L, W - R, T, H - B);
  return figure;
}

// A vertical rule and the values at the nearest logged step, following the pointer.
function hover(svg, series, sx, x0, x1, left, right, top, bottom) {
  const rule = el("line", { y1: top, y2: bottom, class: "rule", visibility: "hidden" }, svg);
  const label = el("text", { y: top + 10, class: "hover-label", visibility: "hidden" }, svg);
  svg.addEventListener("pointermove", (ev) => {
    const box = svg.getBoundingClientRect();
    const px = ((ev.clientX - box.left) / box.width) * svg.viewBox.baseVal.width;
    if (px < left || px > right) return;
    const x = x0 + ((px - left) / (right - left)) * (x1 - x0);
    const parts = [];
    let at = null;
    for (const s of series) {
      let best = null;
      for (const p of s.points) if (best === null || Math.abs(p[0] - x) < Math.abs(best[0] - x)) best = p;
      if (best) { parts.push(`${s.name} ${fmt(best[1])}`); at = at === null ? best[0] : at; }
    }
    rule.setAttribute("x1", sx(at)); rule.setAttribute("x2", sx(at));
    label.setAttribute("x", Math.min(sx(at) + 4, right - 150));
    label.textContent = `step ${fmt(at)}: ${parts.join(", ")}`;
    rule.setAttribute("visibility", "visible"); label.setAttribute("visibility", "visible");
  });
  svg.addEventListener("pointerleave", () => {
    rule.setAttribute("visibility", "hidden"); label.setAttribute("visibility", "hidden");
  });
}

window.Charts = { lineChart, smooth, fmt, PALETTE };
})();
