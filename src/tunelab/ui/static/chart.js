// Small SVG charts for the web UI: a line chart that takes points as they stream in (loss, metric and LR
// curves) and a scatter plot with labelled points (the compare page's metric against each cost). Hand-written so
// the page needs nothing from a CDN; each chart is an <svg role="img"> with a <title> and a description that
// states its latest values for screen readers.

const SVG = "http://www.w3.org/2000/svg";
const PALETTE = ["#1f63b5", "#c2410c", "#15803d", "#7e22ce", "#b91c1c", "#0e7490", "#a16207", "#475569"];
const W = 560, H = 260, M = { top: 28, right: 16, bottom: 44, left: 64 };

function el(name, attrs = {}, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

// Short numbers for tick labels: 0.000123 -> 1.23e-4, 12345 -> 12,345, 0.5 -> 0.5.
export function fmtNum(v, digits = 3) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (typeof v !== "number") return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2);
  if (Number.isInteger(v)) return v.toLocaleString("en");
  return Number(v.toPrecision(digits)).toString();
}

// Tick labels with as many decimals as their spacing needs (0.6935, 0.6940, ... rather than 0.694 twice).
function tickFormat(values) {
  if (values.length < 2) return v => fmtNum(v);
  const step = Math.abs(values[1] - values[0]);
  const big = Math.max(...values.map(Math.abs));
  if (big !== 0 && (big < 1e-3 || big >= 1e6)) return v => (v === 0 ? "0" : v.toExponential(Math.max(0, Math.ceil(Math.log10(big / step)))));
  let decimals = 0;  // the fewest that write every tick exactly (a step of 0.025 needs three)
  while (decimals < 12 && values.some(v => Math.abs(Number(v.toFixed(decimals)) - v) > step * 1e-6)) decimals += 1;
  return v => v.toLocaleString("en", { minimumFractionDigits: decimals, maximumFractionDigits: decimals });
}

// About `count` round tick values covering [lo, hi].
function ticks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count, mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map(f => f * mag).find(s => s >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

function extent(values, padFraction = 0.05) {
  let lo = Math.min(...values), hi = Math.max(...values);
  if (!Number.isFinite(lo)) return [0, 1];
  if (lo === hi) { const d = Math.abs(lo) * 0.1 || 1; lo -= d; hi += d; }
  const pad = (hi - lo) * padFraction;
  return [lo - pad, hi + pad];
}

// A figure with an <svg> inside, its caption and the accessible name/description wired up.
function frame(container, title) {
  const id = `chart-${Math.random().toString(36).slice(2, 9)}`;
  const figure = document.createElement("figure");
  figure.className = "chart";
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-labelledby": `${id}-t ${id}-d` });
  const caption = document.createElement("figcaption");
  caption.textContent = title;
  figure.append(caption, svg);
  container.append(figure);
  return { figure, svg, id };
}

function axes(svg, x, y, xTicks, yTicks, xLabel, yLabel, fmtY = tickFormat(yTicks)) {
  const g = el("g", { class: "axes" });
  const fmtX = tickFormat(xTicks);
  for (const t of yTicks) {
    g.append(el("line", { x1: M.left, x2: W - M.right, y1: y(t), y2: y(t), class: "grid" }));
    g.append(el("text", { x: M.left - 6, y: y(t) + 4, "text-anchor": "end" }, fmtY(t)));
  }
  for (const t of xTicks) {
    g.append(el("line", { x1: x(t), x2: x(t), y1: H - M.bottom, y2: H - M.bottom + 4, class: "tick" }));
    g.append(el("text", { x: x(t), y: H - M.bottom + 16, "text-anchor": "middle" }, fmtX(t)));
  }
  g.append(el("line", { x1: M.left, x2: W - M.right, y1: H - M.bottom, y2: H - M.bottom, class: "axis" }));
  g.append(el("line", { x1: M.left, x2: M.left, y1: M.top, y2: H - M.bottom, class: "axis" }));
  if (xLabel) g.append(el("text", { x: (M.left + W - M.right) / 2, y: H - 6, "text-anchor": "middle", class: "label" }, xLabel));
  if (yLabel) {
    g.append(el("text", { x: 14, y: (M.top + H - M.bottom) / 2, "text-anchor": "middle", class: "label",
                          transform: `rotate(-90 14 ${(M.top + H - M.bottom) / 2})` }, yLabel));
  }
  svg.append(g);
}

function legend(svg, names) {
  let x = M.left + 8;
  names.forEach((name, i) => {
    svg.append(el("rect", { x, y: 6, width: 10, height: 10, fill: PALETTE[i % PALETTE.length] }));
    const label = el("text", { x: x + 14, y: 15, class: "legend" }, name);
    svg.append(label);
    x += 24 + name.length * 6.5;
  });
}

function describe(svg, id, title, description) {
  svg.prepend(el("desc", { id: `${id}-d` }, description));
  svg.prepend(el("title", { id: `${id}-t` }, title));
}

// A line chart that grows: `add(series, x, y)` appends a point and redraws on the next animation frame, so a
// burst of streamed records costs one redraw. `log: true` draws y on a log scale (learning rates).
export class LineChart {
  constructor(container, { title, xLabel = "step", yLabel = "", log = false, markers = false }) {
    Object.assign(this, { title, xLabel, yLabel, log, markers, series: new Map(), pending: false });
    ({ figure: this.figure, svg: this.svg, id: this.id } = frame(container, title));
    this.figure.dataset.points = "0";
    this.draw();
  }

  add(name, x, y) {
    if (typeof x !== "number" || typeof y !== "number" || !Number.isFinite(y) || (this.log && y <= 0)) return;
    if (!this.series.has(name)) this.series.set(name, []);
    this.series.get(name).push([x, y]);
    if (!this.pending) {
      this.pending = true;
      requestAnimationFrame(() => { this.pending = false; this.draw(); });
    }
  }

  clear() {
    this.series = new Map();
    this.draw();
  }

  retitle(title, yLabel = this.yLabel) {
    Object.assign(this, { title, yLabel });
    this.figure.querySelector("figcaption").textContent = title;
    this.draw();
  }

  get count() { let n = 0; for (const pts of this.series.values()) n += pts.length; return n; }

  draw() {
    const svg = this.svg;
    svg.replaceChildren();
    const all = [...this.series.values()].flat();
    this.figure.dataset.points = String(all.length);
    if (!all.length) {
      describe(svg, this.id, this.title, "No points yet.");
      axes(svg, v => v, v => v, [], [], this.xLabel, this.yLabel);
      svg.append(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "waiting for points…"));
      return;
    }
    const tf = this.log ? Math.log10 : v => v;
    const [x0, x1] = extent(all.map(p => p[0]), 0.02);
    const [y0, y1] = extent(all.map(p => tf(p[1])));
    const x = v => M.left + (v - x0) / (x1 - x0) * (W - M.left - M.right);
    const y = v => H - M.bottom - (tf(v) - y0) / (y1 - y0) * (H - M.top - M.bottom);
    const yTicks = this.log ? ticks(Math.floor(y0), Math.ceil(y1), 4).filter(Number.isInteger).map(e => 10 ** e)
                                .filter(v => tf(v) >= y0 && tf(v) <= y1)
                            : ticks(y0, y1);
    axes(svg, x, y, ticks(x0, x1).filter(t => t >= x0 && t <= x1), yTicks, this.xLabel, this.yLabel,
         this.log ? v => v.toExponential(0) : undefined);
    const names = [...this.series.keys()];
    const last = [];
    names.forEach((name, i) => {
      const pts = this.series.get(name), colour = PALETTE[i % PALETTE.length];
      const d = pts.map((p, j) => `${j ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join("");
      svg.append(el("path", { d, fill: "none", stroke: colour, "stroke-width": 2, "data-series": name }));
      if (this.markers || pts.length < 3) {
        for (const p of pts) svg.append(el("circle", { cx: x(p[0]), cy: y(p[1]), r: 3, fill: colour }));
      }
      const [lx, ly] = pts[pts.length - 1];
      last.push(`${name} ${fmtNum(ly)} at ${this.xLabel} ${fmtNum(lx)}`);
    });
    if (names.length > 1 || names[0] !== this.yLabel) legend(svg, names);
    describe(svg, this.id, this.title, `Latest: ${last.join("; ")}.`);
  }
}

// Points {x, y, label}, each labelled beside it.
export function scatterChart(container, { title, xLabel, yLabel, points }) {
  const { svg, id } = frame(container, title);
  const ok = points.filter(p => Number.isFinite(p.x) && Number.isFinite(p.y));
  const [x0, x1] = extent(ok.map(p => p.x), 0.15), [y0, y1] = extent(ok.map(p => p.y), 0.15);
  const x = v => M.left + (v - x0) / (x1 - x0) * (W - M.left - M.right);
  const y = v => H - M.bottom - (v - y0) / (y1 - y0) * (H - M.top - M.bottom);
  axes(svg, x, y, ticks(x0, x1).filter(t => t >= x0 && t <= x1), ticks(y0, y1).filter(t => t >= y0 && t <= y1),
       xLabel, yLabel);
  ok.forEach((p, i) => {
    svg.append(el("circle", { cx: x(p.x), cy: y(p.y), r: 5, fill: PALETTE[i % PALETTE.length] }));
    svg.append(el("text", { x: x(p.x) + 8, y: y(p.y) - 6, class: "point-label" }, p.label));
  });
  describe(svg, id, title, ok.map(p => `${p.label}: ${xLabel} ${fmtNum(p.x)}, ${yLabel} ${fmtNum(p.y)}`).join("; ")
                           || "No points.");
}
