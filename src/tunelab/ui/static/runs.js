// #/runs: every run folder of the workspace (however it was started) in one sortable, filterable table. While a
// run is going the list is fetched again every few seconds (the list only, never a run's metrics file).

import { api, badge, errorBox, fmtDuration, fmtTime, h, pageHref } from "./api.js";
import { fmtNum } from "./chart.js";

export const NAV = "runs";
const REFRESH_MS = 4000;

const COLUMNS = [
  { key: "status", label: "Status", value: r => r.status },
  { key: "name", label: "Run", value: r => r.id },
  { key: "kind", label: "Kind", value: r => r.kind },
  { key: "task", label: "Task", value: r => r.task },
  { key: "method", label: "Method", value: r => r.method },
  { key: "model", label: "Model", value: r => r.model },
  { key: "metric", label: "Metric: base → tuned", value: r => (r.metric ? r.metric.tuned : null) },
  { key: "started", label: "Started", value: r => r.started },
  { key: "duration_s", label: "Time", value: r => r.duration_s },
  { key: "size_mb", label: "Size", value: r => r.size_mb },
];

const shortModel = m => (m ? String(m).replace(/\/+$/, "").split("/").slice(-2).join("/") : "–");

export function metricCell(metric) {
  if (!metric) return "–";
  const { name, base, tuned, greater_is_better: up } = metric;
  const better = typeof base === "number" && typeof tuned === "number" && tuned !== base
    ? ((tuned > base) === (up !== false) ? "better" : "worse") : null;
  return h("span", { class: better ? `metric ${better}` : "metric", title: better ? `tuned is ${better} than base` : null },
           `${name} ${fmtNum(base)} → ${fmtNum(tuned)}`);
}

function progressCell(run) {
  if (run.status !== "running" || !run.total_steps) return null;
  return h("progress", { max: run.total_steps, value: run.step || 0, "aria-label": `${run.id} progress` });
}

export async function render(main) {
  const state = { sort: "started", dir: -1, filter: "", status: "", runs: [] };
  const filterInput = h("input", { id: "runs-filter", type: "search", placeholder: "name, task, method, model…",
                                   oninput: e => { state.filter = e.target.value.toLowerCase(); draw(); } });
  const statusSelect = h("select", { id: "runs-status", onchange: e => { state.status = e.target.value; draw(); } },
    ["", "running", "finished", "failed", "interrupted"].map(s => h("option", { value: s }, s || "any")));
  const count = h("p", { class: "count", "aria-live": "polite" });
  const holder = h("div", { class: "table-wrap" });
  const problem = h("div");
  main.append(
    h("h1", {}, "Runs"),
    h("div", { class: "toolbar" },
      h("label", { for: "runs-filter" }, "Filter"), filterInput,
      h("label", { for: "runs-status" }, "Status"), statusSelect,
      h("a", { class: "button", href: "#/new" }, "New run"),
      h("a", { class: "button secondary", href: "#/compare" }, "Compare runs")),
    problem, count, holder);

  function sortButton(col) {
    const active = state.sort === col.key;
    return h("button", { type: "button", class: "sort", "data-sort": col.key, onclick: () => {
      state.dir = active ? -state.dir : 1;
      state.sort = col.key;
      draw();
    } }, col.label, h("span", { "aria-hidden": "true" }, active ? (state.dir > 0 ? " ▲" : " ▼") : ""));
  }

  // The table is drawn anew on each sort, filter and refresh; a keyboard user's focus in it stays where it was.
  function focusedSelector() {
    const at = document.activeElement;
    if (!at || !holder.contains(at)) return null;
    if (at.dataset.sort) return `button[data-sort="${at.dataset.sort}"]`;
    const row = at.closest("tr[data-run]");
    return row ? `tr[data-run="${CSS.escape(row.dataset.run)}"] a` : null;
  }

  function draw() {
    const refocus = focusedSelector();
    drawTable();
    if (refocus) holder.querySelector(refocus)?.focus();
  }

  function drawTable() {
    const col = COLUMNS.find(c => c.key === state.sort);
    const shown = state.runs
      .filter(r => !state.status || r.status === state.status)
      .filter(r => !state.filter || [r.id, r.name, r.task, r.method, r.model, r.kind, r.status]
        .some(v => String(v ?? "").toLowerCase().includes(state.filter)))
      .sort((a, b) => {
        const x = col.value(a), y = col.value(b);
        if (x === y) return 0;
        if (x === null || x === undefined) return 1;  // missing values last, whichever the direction
        if (y === null || y === undefined) return -1;
        return (x < y ? -1 : 1) * state.dir;
      });
    count.textContent = `${shown.length} of ${state.runs.length} runs`;
    if (!state.runs.length) {
      holder.replaceChildren(h("p", { class: "empty" }, "No runs in this workspace yet. ",
                               h("a", { href: "#/new" }, "Start one"), " or train from the command line."));
      return;
    }
    holder.replaceChildren(h("table", { class: "runs" },
      h("thead", {}, h("tr", {}, COLUMNS.map(c => h("th", {
        scope: "col", "aria-sort": state.sort === c.key ? (state.dir > 0 ? "ascending" : "descending") : null,
      }, sortButton(c))))),
      h("tbody", {}, shown.map(r => h("tr", { "data-run": r.id },
        h("td", {}, badge(r.status), progressCell(r)),
        h("th", { scope: "row" }, h("a", { href: pageHref("run", r.id) }, r.id)),
        h("td", {}, r.kind || "–"),
        h("td", {}, r.task || "–"),
        h("td", {}, r.method || "–"),
        h("td", { title: r.model || "" }, shortModel(r.model)),
        h("td", {}, metricCell(r.metric)),
        h("td", {}, fmtTime(r.started)),
        h("td", { class: "num" }, fmtDuration(r.duration_s)),
        h("td", { class: "num" }, typeof r.size_mb === "number" ? `${fmtNum(r.size_mb)} MB` : "–"))))));
  }

  let timer = null, stopped = false;
  async function load() {
    try {
      const data = await api("api/runs");
      state.runs = data.runs;
      document.getElementById("workspace").textContent = data.workspace ? `workspace: ${data.workspace}` : "";
      problem.replaceChildren();
      draw();
    } catch (error) {
      problem.replaceChildren(errorBox(error));
    }
    if (!stopped && state.runs.some(r => r.status === "running")) timer = setTimeout(load, REFRESH_MS);
  }
  await load();
  return () => { stopped = true; clearTimeout(timer); };
}
