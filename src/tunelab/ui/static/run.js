// #/run/<id>: one run. Its loss / metric / LR curves grow from the server-sent events of metrics.jsonl (the
// server tails the file; the page appends each record as it comes), with progress and ETA from the status
// events; then what the run measured (base vs probe vs tuned, forgetting, samples, data report), its report.html,
// the resolved recipe, and the actions: stop, resume, export, open in the playground.

import { ApiError, api, badge, errorBox, fmtBytes, fmtDuration, fmtTime, h, pageHref, put, runApi, table } from "./api.js";
import { LineChart, fmtNum } from "./chart.js";
import { metricCell } from "./runs.js";

export const NAV = "runs";
const POLL_MS = 5000;  // how often a running compare / cv / sweep folder is fetched again
const NOT_METRICS = new Set(["type", "step", "epoch", "split", "improved", "loss", "examples", "tokens"]);

// The headline metric of an eval record: the run's own, else its first plain number that is not bookkeeping.
function metricOf(record, name) {
  if (name && typeof record[name] === "number") return name;
  return Object.keys(record).find(k => !NOT_METRICS.has(k) && typeof record[k] === "number") || null;
}

// A value of any shape as something readable: tables for lists of records, definition lists for objects.
function valueView(value, depth = 0) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number") return fmtNum(value, 4);
  if (typeof value !== "object") return String(value);
  if (Array.isArray(value)) {
    if (value.length && value.every(v => v && typeof v === "object" && !Array.isArray(v))) {
      const keys = [...new Set(value.flatMap(Object.keys))];
      return h("div", { class: "table-wrap" }, table(keys, value.map(row => keys.map(k => cellText(row[k])))));
    }
    return value.map(v => cellText(v)).join(", ");
  }
  if (depth > 2) return cellText(value);
  return h("dl", { class: "kv" }, Object.entries(value).flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, valueView(v, depth + 1))]));
}

function cellText(v) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "number") return fmtNum(v, 4);
  if (typeof v === "object") {
    const text = JSON.stringify(v, (k, x) => (typeof x === "number" ? Number(fmtNum(x, 3)) || x : x));
    return text.length > 160 ? `${text.slice(0, 157)}…` : text;
  }
  return String(v);
}

// base / linear probe / tuned for every split and scalar metric, with tuned minus base.
function resultsTable(results) {
  const kinds = [["base", "base"], ["probe", "linear probe"], ["tuned", "tuned"]].filter(([k]) => results && results[k]);
  if (!kinds.length) return h("p", { class: "empty" }, "No evaluation results yet.");
  const splits = [...new Set(kinds.flatMap(([k]) => Object.keys(results[k])))];
  const rows = [];
  for (const split of splits) {
    const metrics = [...new Set(kinds.flatMap(([k]) => Object.entries(results[k][split] || {})
      .filter(([name, v]) => typeof v === "number" && name !== "examples").map(([name]) => name)))];
    for (const name of metrics) {
      const vals = kinds.map(([k]) => (results[k][split] || {})[name]);
      const base = (results.base?.[split] || {})[name], tuned = (results.tuned?.[split] || {})[name];
      const change = typeof base === "number" && typeof tuned === "number" ? tuned - base : null;
      rows.push([split, name, ...vals.map(v => fmtNum(v, 4)), change === null ? "–" : `${change >= 0 ? "+" : ""}${fmtNum(change, 3)}`]);
    }
  }
  return h("div", { class: "table-wrap" },
           table(["split", "metric", ...kinds.map(([, label]) => label), "tuned − base"], rows, { className: "results" }));
}

function forgettingView(forgetting) {
  if (!forgetting) return h("p", { class: "empty" }, "Not measured for this run (eval.forgetting).");
  if ("before" in forgetting && "after" in forgetting) {
    const change = typeof forgetting.change === "number" ? forgetting.change
      : (typeof forgetting.before === "number" && typeof forgetting.after === "number" ? forgetting.after - forgetting.before : null);
    return h("div", {},
      h("p", {}, `${forgetting.kind || "probe"} on ${forgetting.file || "the probe text"}: ${forgetting.metric || "metric"} `,
        h("strong", {}, fmtNum(forgetting.before, 4)), " before training, ", h("strong", {}, fmtNum(forgetting.after, 4)),
        " after", change === null ? "." : ` (change ${change >= 0 ? "+" : ""}${fmtNum(change, 3)}).`));
  }
  return valueView(forgetting);
}

function dataReportView(report) {
  if (!report) return h("p", { class: "empty" }, "No data report in this run folder.");
  const splits = report.splits || {};
  const rows = Object.entries(splits).map(([name, s]) => {
    const dropped = s.dropped && typeof s.dropped === "object"
      ? Object.values(s.dropped).reduce((a, b) => a + (typeof b === "number" ? b : 0), 0) : s.dropped;
    const why = s.dropped && typeof s.dropped === "object"
      ? Object.entries(s.dropped).filter(([, n]) => n).map(([k, n]) => `${k.replace(/_/g, " ")} ${n}`).join(", ") : "";
    return [name, (report.files || {})[name] || (s.from ? `from ${s.from}` : "–"), fmtNum(s.rows_read), `${fmtNum(dropped)}${why ? ` (${why})` : ""}`,
            fmtNum(s.rows), s.labels ? cellText(s.labels) : "–",
            s.tokens ? `${fmtNum(s.tokens.tokens)}${s.tokens.truncated ? ` (${s.tokens.truncated} cut)` : ""}` : "–",
            s.overlap_with_train === undefined ? "–" : fmtNum(s.overlap_with_train)];
  });
  const rest = Object.fromEntries(Object.entries(report).filter(([k]) => !["splits", "files"].includes(k)));
  return h("div", {},
    rows.length ? h("div", { class: "table-wrap" }, table(["split", "file", "rows read", "dropped", "kept", "labels",
                                                           "tokens", "also in train"], rows)) : null,
    Object.keys(rest).length ? valueView(rest) : null);
}

function samplesView(samples) {
  if (!samples || (Array.isArray(samples) && !samples.length)) return h("p", { class: "empty" }, "No samples saved.");
  if (!Array.isArray(samples) && typeof samples === "object") {
    return h("div", {}, Object.entries(samples).map(([k, v]) => h("div", {}, h("h4", {}, k), valueView(v))));
  }
  return valueView(samples);
}

function section(title, ...body) {
  const id = `sec-${title.toLowerCase().replace(/[^a-z]+/g, "-")}`;
  return h("section", { "aria-labelledby": id }, h("h2", { id }, title), ...body);
}

export async function render(main, { id }) {
  let run;
  try {
    run = await api(runApi(id));
  } catch (error) {
    main.append(h("h1", {}, id), errorBox(error), h("p", {}, h("a", { href: "#/runs" }, "Back to the runs")));
    return null;
  }
  const status = h("span", { id: "run-status" }, badge(run.status));
  const meta = h("p", { class: "meta" });
  // Drawn again when the run ends: a run just launched has no config.yaml (task, method, model) yet.
  const drawMeta = () => meta.replaceChildren([run.task, run.method, run.model, run.started ? `started ${fmtTime(run.started)}` : null,
                                               typeof run.size_mb === "number" ? `${fmtNum(run.size_mb)} MB` : null].filter(Boolean).join(" · "));
  const progressBar = h("progress", { id: "run-progress", max: 1, value: 0 });
  const progressText = h("span", { class: "progress-text" });
  const notice = h("div", { "aria-live": "polite" });
  const actions = h("div", { class: "toolbar actions" });
  const measured = h("div");
  const charts = h("div", { class: "charts" });
  const loss = new LineChart(charts, { title: "Loss", yLabel: "loss" });
  const metric = new LineChart(charts, { title: `Metric${run.metric ? `: ${run.metric.name}` : ""}`,
                                         yLabel: run.metric ? run.metric.name : "metric", markers: true });
  const lr = new LineChart(charts, { title: "Learning rate", yLabel: "lr", log: true });
  const progressSection = section("Progress", h("div", { class: "progress" }, h("label", { for: "run-progress" }, "Training progress"),
                                                 progressBar, progressText));
  const curvesSection = section("Curves", charts);
  loss.figure.id = "chart-loss";
  metric.figure.id = "chart-metric";
  lr.figure.id = "chart-lr";

  main.append(
    h("p", { class: "crumbs" }, h("a", { href: "#/runs" }, "Runs"), " / ", run.kind || "run"),
    h("h1", {}, run.name || id, " ", status),
    meta,
    actions, notice,
    progressSection, curvesSection,
    measured);

  const showProgress = p => {
    const step = p.step ?? 0, total = p.total ?? null;
    progressBar.max = total || 1;
    progressBar.value = total ? Math.min(step, total) : (run.status === "finished" ? 1 : 0);
    const parts = [total ? `step ${fmtNum(step)} of ${fmtNum(total)}` : `step ${fmtNum(step)}`];
    if (run.status === "running" && typeof p.elapsed_s === "number") parts.push(`${fmtDuration(p.elapsed_s)} elapsed`);
    if (run.status === "running" && typeof p.eta_s === "number") parts.push(`about ${fmtDuration(p.eta_s)} left`);
    progressText.textContent = parts.join(" · ");
  };

  function drawActions() {
    const running = run.status === "running";
    const formats = run.exports || [];
    const format = h("select", { id: "export-format", onchange: () => { quant.hidden = format.value !== "gguf"; } },
                     formats.map(f => h("option", { value: f }, f)));
    // GGUF's tensor types (`tunelab export --quant`); the other formats take none.
    const quantInput = h("select", { id: "export-quant" }, ["", "f32", "f16", "q8_0"].map(q => h("option", { value: q }, q || "default")));
    const quant = h("span", { class: "group", hidden: formats[0] !== "gguf" }, h("label", { for: "export-quant" }, "Quantisation"), quantInput);
    put(actions, 
      running ? h("button", { type: "button", id: "stop", class: "danger", onclick: stop }, "Stop") : null,
      !running && run.resumable ? h("button", { type: "button", id: "resume", onclick: resume }, "Resume") : null,
      !running && formats.length && run.status === "finished" ? h("span", { class: "group" },
        h("label", { for: "export-format" }, "Export as"), format, quant,
        h("button", { type: "button", id: "export", onclick: () => doExport(format.value, format.value === "gguf" ? quantInput.value : "") }, "Export")) : null,
      run.playground && run.status === "finished"
        ? h("a", { class: "button", id: "open-playground", href: pageHref("playground", id) }, "Open in playground") : null,
      run.kind === "compare" ? h("a", { class: "button secondary", href: `#/compare?ids=${encodeURIComponent(id)}` }, "Show comparison") : null,
      h("a", { class: "button secondary", href: `#/new?from=${encodeURIComponent(id)}` }, "New run from this recipe"));
  }

  async function act(what, fn) {
    notice.replaceChildren(h("p", { class: "note" }, `${what}…`));
    try {
      await fn();
    } catch (error) {
      notice.replaceChildren(errorBox(error));
    }
  }
  const stop = () => act("Stopping", async () => {
    await api(runApi(id, "/stop"), { method: "POST" });
    notice.replaceChildren(h("p", { class: "note" }, "Stopping: the run saves a resumable checkpoint, then ends."));
  });
  const resume = () => act("Resuming", async () => {
    const answer = await api(runApi(id, "/resume"), { method: "POST" });
    if (answer.id && answer.id !== id) location.hash = pageHref("run", answer.id);
    else window.dispatchEvent(new HashChangeEvent("hashchange"));  // draw this page afresh, with a new stream
  });
  const doExport = (format, quant) => act(`Exporting as ${format}`, async () => {
    const answer = await api(runApi(id, "/export"), { method: "POST", body: { format, quant: quant || null } });
    notice.replaceChildren(h("p", { class: "note", id: "export-done" }, `Exported to ${answer.path}.`));
  });

  function drawMeasured() {
    if (run.kind !== "run") {
      // A compare, cv or sweep folder: its summary (the table of its runs, each with a page of its own), its report
      put(measured, section("Summary", run.summary ? valueView(run.summary) : h("p", { class: "empty" }, "No summary yet: it is still running, or it stopped before writing one.")),
          run.has_report ? section("Report", reportFrame()) : null, recipeSection(), logSection());
      return;
    }
    const parts = [];
    if (run.metric) parts.push(h("p", { class: "headline" }, "Headline: ", metricCell(run.metric)));
    const s = run.summary || {};
    const facts = [
      ["trainable", typeof s.trainable_percent === "number" ? `${fmtNum(s.trainable_params)} of ${fmtNum(s.total_params)} (${fmtNum(s.trainable_percent)} %)` : null],
      ["training time", fmtDuration(s.train_seconds)], ["peak memory", typeof s.peak_memory_mb === "number" ? fmtBytes(s.peak_memory_mb * 2 ** 20) : null],
      ["saved", s.artifact ? `${s.artifact} (${fmtNum(s.artifact_mb)} MB)` : null], ["steps", s.steps],
      ["best step", s.best_step], ["device", s.device],
    ].filter(([, v]) => v !== null && v !== undefined && v !== "–");
    if (facts.length) parts.push(h("dl", { class: "kv facts" }, facts.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))])));
    put(measured, 
      section("Results: base vs probe vs tuned", ...parts, resultsTable(run.results)),
      section("Forgetting", forgettingView(run.forgetting)),
      section("Samples", samplesView(run.samples)),
      section("Data report", dataReportView(run.data_report)),
      run.has_report ? section("Report", reportFrame()) : null, recipeSection(), logSection());
  }

  // report.html in a frame that runs no scripts (a run folder may come from someone else)
  const reportFrame = () => h("iframe", { src: runApi(id, "/report"), title: `report.html of ${id}`, class: "report",
                                          sandbox: "allow-same-origin", loading: "lazy" });
  const recipeSection = () => section("Recipe",
    h("p", {}, h("a", { href: runApi(id, "/recipe.yaml"), download: "recipe.yaml", id: "recipe-download" }, "Download the resolved recipe (YAML)")),
    h("pre", { class: "yaml", tabindex: "0", "aria-label": "resolved recipe" }, run.recipe_yaml || ""));
  const logSection = () => (run.log_tail ? section("Log", h("details", { open: run.status === "failed" },
    h("summary", {}, "Last lines of the log"), h("pre", { class: "log", tabindex: "0" }, run.log_tail))) : null);

  drawMeta();
  showProgress(run.progress || {});
  drawActions();
  drawMeasured();

  // Fetched again when the run ends: what it measured, its actions, its heading.
  async function refresh() {
    try {
      run = await api(runApi(id));
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      notice.replaceChildren(errorBox(error));
      return false;
    }
    status.replaceChildren(badge(run.status));
    // A compare launched from the UI is listed as a run until its process has made its folder.
    progressSection.hidden = curvesSection.hidden = run.kind !== "run";
    drawMeta();
    showProgress(run.progress || {});
    drawActions();
    drawMeasured();
    if (run.metric) metric.retitle(`Metric: ${run.metric.name}`, run.metric.name);
    return true;
  }

  progressSection.hidden = curvesSection.hidden = run.kind !== "run";
  if (run.kind !== "run") {
    // No metrics of its own (its runs have theirs, each on its own page): fetched again while it runs.
    let timer = null;
    const poll = async () => {
      if (await refresh() && run.status === "running") timer = setTimeout(poll, POLL_MS);
      else main.dataset.ended = "true";
    };
    if (run.status === "running") timer = setTimeout(poll, POLL_MS);
    else main.dataset.ended = "true";
    return () => clearTimeout(timer);
  }

  // The live curves. A finished run's stream replays its metrics.jsonl and ends; a running one keeps going.
  const metricName = run.metric ? run.metric.name : null;
  const source = new EventSource(runApi(id, "/events"));
  let ended = false;
  source.addEventListener("metric", e => {
    let r;
    try {
      r = JSON.parse(e.data);
    } catch {
      return;  // not a record (a line a crash cut short): the lines after it are whole
    }
    if (r.type === "train") {
      loss.add("train", r.step, r.loss);
      lr.add("lr", r.step, r.lr);
    } else if (r.type === "eval") {
      const split = r.split || "validation";
      loss.add(`${split} loss`, r.step, r.loss);
      const name = metricOf(r, metricName);
      if (name) metric.add(metricName ? split : `${split} ${name}`, r.step, r[name]);
    }
  });
  // The log was cut back (a resume goes on from its checkpoint's step) or begun again: its lines come again.
  source.addEventListener("reset", () => {
    for (const chart of [loss, lr, metric]) chart.clear();
  });
  source.addEventListener("status", e => {
    const s = JSON.parse(e.data);
    const changed = s.status !== run.status;
    run.status = s.status;
    status.replaceChildren(badge(s.status));
    showProgress({ ...(run.progress || {}), step: s.step, total: s.total, eta_s: s.eta_s });
    if (changed) drawActions();
  });
  // After `end` the server closes the stream; the page closes its side when that close arrives (closing first would
  // abort a response that is ending anyway), before EventSource could reconnect.
  source.addEventListener("end", async () => {
    ended = true;
    if (await refresh()) main.dataset.ended = "true";
  });
  source.addEventListener("error", () => {
    if (ended) source.close();
    else if (source.readyState === EventSource.CLOSED) {
      notice.replaceChildren(errorBox("The live stream of this run closed; reload the page to follow it again."));
    }
  });
  return () => source.close();
}
