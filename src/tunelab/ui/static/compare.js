// #/compare: pick finished runs (or a `tunelab compare` folder) and see them side by side: the table POST
// /api/compare answers and its plots (metric vs trainable %, peak memory, time, latency, forgetting). Or launch a
// `tunelab compare` of several methods on one recipe. #/compare?ids=a,b preselects and compares.

import { api, badge, errorBox, h, pageHref, runPath, table } from "./api.js";
import { fmtNum, scatterChart } from "./chart.js";
import { metricCell } from "./runs.js";

export const NAV = "compare";

// A forgetting measurement as "before → after (change)".
function forgettingText(f) {
  if (!f || typeof f !== "object") return f === null || f === undefined ? "–" : fmtNum(f, 4);
  const change = f.change ?? (typeof f.after === "number" && typeof f.before === "number" ? f.after - f.before : null);
  return `${fmtNum(f.before, 4)} → ${fmtNum(f.after, 4)}${change === null ? "" : ` (${change >= 0 ? "+" : ""}${fmtNum(change, 3)})`}`;
}

function cell(key, row) {
  const v = row[key];
  if (key === "metric") return metricCell(v);
  if (key === "forgetting") return forgettingText(v);
  if (v === null || v === undefined) return "–";
  if (typeof v === "number") return fmtNum(v, 4);
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

// The table POST /api/compare answers (its columns, one row per run or per method of a compare folder) and a
// plot per cost of the headline metric against it.
function compareView(answer) {
  const rows = answer.rows || [];
  const columns = (answer.columns || []).map(c => (typeof c === "string" ? { key: c, label: c } : c));
  const unfinished = rows.some(r => r.status && r.status !== "ok");
  const name = r => r.method && rows.filter(x => x.method === r.method).length === 1 ? r.method : (r.id || r.method);
  const body = rows.map(r => [
    r.id ? h("a", { href: pageHref("run", r.id) }, r.id) : (r.method || "–"),
    ...columns.map(c => cell(c.key, r)),
    ...(unfinished ? [r.status === "ok" ? "ok" : `${r.status}${r.reason ? `: ${r.reason}` : ""}`] : []),
  ]);
  const plots = h("div", { class: "charts", id: "compare-plots" });
  for (const plot of answer.plots || []) {
    if (!plot.points || !plot.points.length) continue;
    scatterChart(plots, { title: `${plot.y_label} vs ${plot.x_label}`, xLabel: plot.x_label, yLabel: plot.y_label,
                          points: plot.points.map(p => ({ x: p.x, y: p.y, label: name(p) })) });
  }
  return h("div", {},
    h("div", { class: "table-wrap" }, table(["run", ...columns.map(c => c.label), ...(unfinished ? ["status"] : [])], body,
                                            { caption: "Runs compared", className: "compare" })),
    plots.childElementCount ? plots : h("p", { class: "empty" }, "No finished row to plot."));
}

export async function render(main, params) {
  const [list, schema, recipes] = await Promise.all([api("api/runs"), api("api/schema"), api("api/recipes")]);
  const candidates = list.runs.filter(r => r.status === "finished" && (r.kind === "run" || r.kind === "compare"));
  const preselected = new Set((params.ids || "").split(",").filter(Boolean));
  const result = h("div", { id: "compare-result", "aria-live": "polite" });
  const compareButton = h("button", { type: "submit", id: "compare-button" }, "Compare");

  const picks = h("fieldset", { class: "picks" }, h("legend", {}, "Runs to compare"),
    candidates.length ? candidates.map((r, i) => h("div", { class: "check" },
      h("input", { type: "checkbox", id: `pick-${i}`, value: r.id, checked: preselected.has(r.id) }),
      h("label", { for: `pick-${i}` }, h("span", {}, r.id), " ", badge(r.kind === "compare" ? "compare" : r.status),
        h("span", { class: "note" }, ` ${[r.task, r.method].filter(Boolean).join(", ")}`))))
      : h("p", { class: "empty" }, "No finished runs yet."));

  async function run(event) {
    if (event) event.preventDefault();
    const ids = [...picks.querySelectorAll("input:checked")].map(i => i.value);
    if (!ids.length) { result.replaceChildren(errorBox("Pick at least one run (or one compare folder) to compare.")); return; }
    compareButton.disabled = true;
    result.replaceChildren(h("p", { class: "note" }, "comparing…"));
    try {
      result.replaceChildren(compareView(await api("api/compare", { method: "POST", body: { ids } })));
      history.replaceState(null, "", `#/compare?ids=${ids.map(encodeURIComponent).join(",")}`);
    } catch (error) {
      result.replaceChildren(errorBox(error));
    } finally {
      compareButton.disabled = false;
    }
  }

  // Launching `tunelab compare`: a recipe and the methods to train on it.
  const methodField = schema.sections.flatMap(s => s.fields).find(f => f.key === "method.name");
  const methods = methodField && methodField.choices ? methodField.choices : [];
  const launchRecipe = h("select", { id: "launch-recipe" }, recipes.recipes.map(r => h("option", { value: r.name }, r.name)));
  const launchState = h("div", { "aria-live": "polite" });
  const methodPicks = h("fieldset", { class: "picks inline" }, h("legend", {}, "Methods"),
    methods.map((m, i) => h("div", { class: "check" }, h("input", { type: "checkbox", id: `method-${i}`, value: m, checked: ["full", "lora"].includes(m) }),
                            h("label", { for: `method-${i}` }, m))));
  async function launch(event) {
    event.preventDefault();
    const chosen = [...methodPicks.querySelectorAll("input:checked")].map(i => i.value);
    launchState.replaceChildren(h("p", { class: "note" }, "launching…"));
    try {
      const recipe = await api(`api/recipes/${runPath(launchRecipe.value)}`);
      const answer = await api("api/compare/launch", { method: "POST", body: { yaml: recipe.yaml, methods: chosen } });
      location.hash = pageHref("run", answer.id);
    } catch (error) {
      launchState.replaceChildren(errorBox(error));
    }
  }

  main.append(h("h1", {}, "Compare runs"),
    h("form", { id: "compare-form", onsubmit: run }, picks, compareButton),
    result,
    h("details", { class: "section" }, h("summary", {}, "Launch a comparison of methods from a recipe"),
      h("form", { id: "compare-launch", onsubmit: launch },
        h("div", { class: "row" }, h("label", { for: "launch-recipe" }, "Recipe"), launchRecipe),
        methodPicks, h("button", { type: "submit" }, "Launch tunelab compare"), launchState)));
  if (preselected.size) await run();
  return null;
}
