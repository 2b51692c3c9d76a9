// #/new: start a run. The recipe's YAML is the source of truth: the form (generated from GET /api/schema, each
// field's description as its help text) edits one key of the YAML at a time, and every change of the YAML is
// checked by POST /api/validate, whose resolved config fills the form back and whose errors appear beside the
// field they name. An advise panel (POST /api/advise) estimates memory and time and lists the methods that fit.
// Launch posts the YAML to /api/runs and opens the new run's page. #/new?recipe=NAME or ?from=RUN_ID starts from a
// shipped recipe or from an earlier run's resolved recipe.

import { api, errorBox, fmtBytes, fmtDuration, h, pageHref, put, runApi, runPath } from "./api.js";
import { fmtNum } from "./chart.js";
import { deleteKey, getKey, setKey } from "./yaml.js";

export const NAV = "new";
const OPEN_SECTIONS = new Set(["model", "data", "task", "method"]);
const BROWSE = /^(model\.path|data\.(train|validation|test))$/;  // keys a file picker helps with

const STARTER = `# A new run. Fill in the model and the training data; every other key has a default.
model:
  path:
data:
  train:
task:
  type: classification
method:
  name: lora
`;

const fieldId = key => `f-${key.replace(/[^A-Za-z0-9_-]/g, "-")}`;

function getPath(obj, dotted) {
  return dotted.split(".").reduce((o, k) => (o && typeof o === "object" ? o[k] : undefined), obj);
}

// What kind of control a schema field gets, from its choices and its type text as GET /api/schema words it
// ("int", "float | null", "bool", "list | 'all-linear' | null", "int | 'epoch'", "'cut' | 'drop'", ...).
function kindOf(field) {
  const t = String(field.type || "").toLowerCase().replace(/ \| null$/, "");
  if (t.startsWith("list")) return "list";
  if (field.choices && field.choices.length) return "select";
  if (t === "bool") return "checkbox";
  if (t === "int") return "int";
  if (t === "float") return "float";
  if (t === "dict") return "json";
  if (t === "str") return "text";
  return "mixed";  // a number or a word ("int | 'epoch'", "bool | 'auto'"): typed text, read as what it looks like
}

function showValue(kind, value) {
  if (value === null || value === undefined) return "";
  if (kind === "list") return Array.isArray(value) ? value.map(v => (typeof v === "object" ? JSON.stringify(v) : String(v))).join(", ") : String(value);
  if (kind === "json") return typeof value === "object" ? JSON.stringify(value) : String(value);
  return String(value);
}

// The control's value for the YAML, or undefined to take the key out (an emptied optional field).
function readValue(field, kind, input) {
  if (kind === "checkbox") return input.checked;
  if (kind === "select") return input.value === "" ? undefined : field.choices[Number(input.value)];
  const text = input.value.trim();
  if (text === "") return undefined;
  if (kind === "int") return Number.isInteger(Number(text)) ? Number(text) : text;
  if (kind === "float") return Number.isFinite(Number(text)) ? Number(text) : text;
  if (kind === "list") {
    if (text.startsWith("[")) { try { return JSON.parse(text); } catch { return text; } }
    return text.split(",").map(s => s.trim()).filter(Boolean).map(s => (/^-?\d+(\.\d+)?$/.test(s) ? Number(s) : s));
  }
  if (kind === "json") { try { return JSON.parse(text); } catch { return text; } }
  if (kind === "mixed") {
    if (/^(true|false)$/i.test(text)) return text.toLowerCase() === "true";
    return text !== "" && Number.isFinite(Number(text)) ? Number(text) : text;
  }
  return input.value;
}

export async function render(main, params) {
  const [schema, recipes] = await Promise.all([api("api/schema"), api("api/recipes")]);
  const controls = new Map();  // key -> {field, kind, input, error}
  let current = null;  // the last resolved config the server answered
  let yamlText = STARTER, checkSeq = 0, adviseSeq = 0, timer = null, adviseTimer = null, lastAdvised = null;

  const yamlArea = h("textarea", { id: "recipe-yaml", rows: 22, spellcheck: "false", class: "yaml",
                                   "aria-describedby": "recipe-yaml-help", oninput: () => { yamlText = yamlArea.value; scheduleCheck(); } });
  const generalErrors = h("div", { id: "general-errors", "aria-live": "polite" });
  const checkState = h("p", { class: "note", id: "check-state", "aria-live": "polite" });
  const advisePanel = h("div", { id: "advise", "aria-live": "polite" }, h("p", { class: "empty" }, "Fill in a model to see estimates."));
  const launchButton = h("button", { type: "submit", id: "launch" }, "Launch");
  const launchState = h("div", { "aria-live": "polite" });
  const recipeSelect = h("select", { id: "recipe-select" }, h("option", { value: "" }, "— choose —"),
    recipes.recipes.map(r => h("option", { value: r.name }, `${r.name}${r.task ? ` (${r.task}, ${r.method || "?"})` : ""}`)));
  const fieldFilter = h("input", { id: "field-filter", type: "search", placeholder: "e.g. lr, max_length, dropout", oninput: filterFields });

  function fieldControl(field) {
    const kind = kindOf(field), id = fieldId(field.key);
    let input;
    if (kind === "checkbox") input = h("input", { id, type: "checkbox" });
    else if (kind === "select") {
      input = h("select", { id }, h("option", { value: "" }, field.default === null || field.default === undefined ? "(unset)" : `(default: ${showValue("text", field.default)})`),
                field.choices.map((c, i) => h("option", { value: String(i) }, c === null ? "null" : String(c))));
    } else {
      input = h("input", { id, type: kind === "int" || kind === "float" ? "number" : "text", step: kind === "float" ? "any" : null,
                           placeholder: field.required || field.default === "required" ? "required"
                             : (field.default === null || field.default === undefined ? "" : `default: ${showValue(kind, field.default)}`) });
    }
    input.name = field.key;
    input.setAttribute("aria-describedby", `help-${id} err-${id}`);
    input.addEventListener(kind === "checkbox" || kind === "select" ? "change" : "input", () => {
      const value = readValue(field, kind, input);
      yamlText = value === undefined ? deleteKey(yamlText, field.key) : setKey(yamlText, field.key, value);
      yamlArea.value = yamlText;
      if (field.choice_descriptions) { current = null; filterFields(); }
      scheduleCheck();
    });
    const error = h("p", { class: "field-error", id: `err-${id}` });
    const browse = BROWSE.test(field.key)
      ? h("button", { type: "button", class: "secondary small", "aria-label": `Browse for ${field.key}`,
                      onclick: () => pickFile(field.key, input) }, "Browse…") : null;
    controls.set(field.key, { field, kind, input, error });
    const label = h("label", { for: id }, h("code", {}, field.key));
    const help = h("p", { class: "help", id: `help-${id}` }, field.description || "");
    if (field.choice_descriptions) {
      // task.type / method.name: what the chosen value means, under the field's own description
      const meaning = h("span", { class: "choice-help" });
      help.append(" ", meaning);
      const explain = () => { meaning.textContent = field.choice_descriptions[field.choices[Number(input.value)]] || ""; };
      input.addEventListener("change", explain);
      controls.get(field.key).explain = explain;
    }
    return h("div", { class: `field field-${kind}`, "data-key": field.key },
      kind === "checkbox" ? h("div", { class: "check" }, input, label) : h("div", { class: "row" }, label, input, browse),
      help, error);
  }

  // output_dir sits beside Launch rather than in the settings.
  const outputField = schema.sections.flatMap(section => section.fields).find(f => f.key === "output_dir");
  const form = h("form", { id: "new-run", novalidate: true, onsubmit: launch },
    h("div", { class: "columns" },
      h("div", { class: "col-form" },
        h("section", { "aria-labelledby": "h-start" }, h("h2", { id: "h-start" }, "Start from"),
          h("div", { class: "row" }, h("label", { for: "recipe-select" }, "Shipped recipe"), recipeSelect,
            h("button", { type: "button", id: "load-recipe", class: "secondary", onclick: () => loadRecipe(recipeSelect.value) }, "Load"))),
        h("section", { "aria-labelledby": "h-settings" }, h("h2", { id: "h-settings" }, "Settings"),
          h("div", { class: "row" }, h("label", { for: "field-filter" }, "Find a setting"), fieldFilter),
          schema.sections.filter(section => section.fields.some(f => f.key !== "output_dir")).map(section => h("details", { class: "section", open: OPEN_SECTIONS.has(section.name), "data-section": section.name },
            h("summary", {}, section.name), h("fieldset", {}, h("legend", { class: "visually-hidden" }, section.name),
              section.fields.some(f => f.key.includes("[]"))
                ? h("p", { class: "note" }, "Multi-task recipes list their tasks in the YAML (tasks: [{name, weight, task, data}]).") : null,
              section.fields.filter(f => !f.key.includes("[]") && f.key !== "output_dir").map(fieldControl)))))),
      h("div", { class: "col-side" },
        h("section", { "aria-labelledby": "h-yaml" }, h("h2", { id: "h-yaml" }, h("label", { for: "recipe-yaml" }, "Recipe (YAML)")),
          h("p", { class: "help", id: "recipe-yaml-help" }, "The recipe is the source of truth: the form edits it, and what you type here fills the form."),
          yamlArea, checkState, generalErrors),
        h("section", { "aria-labelledby": "h-advise" }, h("h2", { id: "h-advise" }, "Estimates"),
          h("button", { type: "button", id: "advise-button", class: "secondary", onclick: () => advise(true) }, "Estimate memory and time"),
          advisePanel),
        h("section", { "aria-labelledby": "h-launch" }, h("h2", { id: "h-launch" }, "Launch"),
          outputField ? fieldControl(outputField) : null,
          h("p", { class: "help" }, "The run trains in a process of its own, in the workspace, that outlives this page and the UI."),
          launchButton, launchState))));
  main.append(h("h1", {}, "New run"), form);

  function applies(field) {
    if (!field.applies_to) return true;
    const chooser = controls.get(field.applies_to.key);
    const value = current ? getPath(current, field.applies_to.key) : chooser && readValue(chooser.field, chooser.kind, chooser.input);
    return value === undefined || field.applies_to.values.includes(value);
  }

  // A field shows when it matches the search and applies to the recipe's task.type / method.name (the keys of
  // other task types and methods would be refused for this recipe anyway).
  function filterFields() {
    const q = fieldFilter.value.trim().toLowerCase();
    for (const { field, input } of controls.values()) {
      const box = input.closest(".field");
      box.hidden = !applies(field) || (!!q && !(`${field.key} ${field.description || ""}`.toLowerCase().includes(q)));
    }
    for (const details of form.querySelectorAll("details.section")) {
      const any = [...details.querySelectorAll(".field")].some(f => !f.hidden);
      details.hidden = !any;
      if (q && any) details.open = true;
    }
  }

  function fill(config) {
    current = config;
    for (const [key, { field, kind, input, explain }] of controls) {
      if (input === document.activeElement) continue;  // never rewrite what the user is typing
      const value = getPath(config, key);
      if (kind === "checkbox") input.checked = !!value;
      else if (kind === "select") {
        const i = field.choices.findIndex(c => JSON.stringify(c) === JSON.stringify(value));
        input.value = i >= 0 ? String(i) : "";
      } else input.value = showValue(kind, value);
      if (explain) explain();
    }
    filterFields();
  }

  // Until the recipe validates, task.type and method.name are read off its text, so the form already shows the
  // keys that belong to them.
  function fillChoosers() {
    for (const { field, input, explain } of controls.values()) {
      if (!field.choice_descriptions || input === document.activeElement) continue;
      const value = getKey(yamlText, field.key) ?? field.default;
      const i = field.choices.indexOf(value);
      input.value = i >= 0 ? String(i) : "";
      if (explain) explain();
    }
    current = null;
    filterFields();
  }

  function showErrors(errors) {
    for (const { input, error } of controls.values()) { error.textContent = ""; input.removeAttribute("aria-invalid"); }
    const loose = [];
    for (const e of errors) {
      const target = controls.get(e.field) || controls.get(String(e.field || "").split(".").slice(0, 2).join("."));
      if (target) {
        target.error.textContent = e.message;
        target.input.setAttribute("aria-invalid", "true");
        const details = target.input.closest("details");
        if (details) details.open = true;
      } else loose.push(e);
    }
    generalErrors.replaceChildren(...loose.map(e => errorBox(e.field ? `${e.field}: ${e.message}` : e.message)));
  }

  function scheduleCheck() {
    clearTimeout(timer);
    checkState.textContent = "checking…";
    timer = setTimeout(check, 350);
  }

  async function check() {
    const seq = ++checkSeq;
    try {
      const answer = await api("api/validate", { method: "POST", body: { yaml: yamlText } });
      if (seq !== checkSeq) return;  // a newer edit is being checked
      if (answer.ok) {
        showErrors([]);
        fill(answer.config);
        checkState.textContent = "The recipe is valid.";
        checkState.className = "note ok";
        clearTimeout(adviseTimer);
        adviseTimer = setTimeout(() => advise(false), 600);
      } else {
        showErrors(answer.errors || []);
        if (answer.config) fill(answer.config);  // only its paths are wrong: the rest resolved
        else fillChoosers();
        checkState.textContent = `${(answer.errors || []).length} problem(s) in the recipe.`;
        checkState.className = "note bad";
      }
    } catch (error) {
      if (seq === checkSeq) { checkState.textContent = ""; generalErrors.replaceChildren(errorBox(error)); }
    }
  }

  // What advise reads from a recipe: it runs again on its own only when one of these changed (it builds each
  // method's model to measure it, which takes a while), and never twice at once.
  const adviseKey = () => JSON.stringify(["model.path", "model.dtype", "model.device", "task.type", "method.name",
    "data.max_length", "train.batch_size", "eval.batch_size"].map(k => getPath(current, k)));
  let advising = false, adviseAgain = false;

  async function advise(force) {
    if (!current && !force) return;
    const key = current ? adviseKey() : null;
    if (!force && key === lastAdvised) return;
    if (advising) { adviseAgain = true; return; }
    advising = true;
    const seq = ++adviseSeq;
    advisePanel.replaceChildren(h("p", { class: "note" }, "estimating…"));
    try {
      const answer = await api("api/advise", { method: "POST", body: { yaml: yamlText } });
      if (seq !== adviseSeq) return;
      lastAdvised = key;
      advisePanel.replaceChildren(adviseView(answer));
    } catch (error) {
      if (seq === adviseSeq) advisePanel.replaceChildren(errorBox(error));
    } finally {
      advising = false;
      if (adviseAgain && seq === adviseSeq) { adviseAgain = false; advise(false); }
    }
  }

  async function loadRecipe(name) {
    if (!name) return;
    try {
      const answer = await api(`api/recipes/${runPath(name)}`);
      setYaml(answer.yaml);
    } catch (error) {
      generalErrors.replaceChildren(errorBox(error));
    }
  }

  function setYaml(text) {
    yamlText = text.endsWith("\n") ? text : `${text}\n`;
    yamlArea.value = yamlText;
    check();
  }

  async function launch(event) {
    event.preventDefault();
    launchButton.disabled = true;
    launchState.replaceChildren(h("p", { class: "note" }, "launching…"));
    try {
      const answer = await api("api/runs", { method: "POST", body: { yaml: yamlText, output_dir: null } });  // output_dir is in the YAML
      location.hash = pageHref("run", answer.id);
    } catch (error) {
      launchButton.disabled = false;
      if (error.field) showErrors([{ field: error.field, message: error.message }]);
      launchState.replaceChildren(errorBox(error));
    }
  }

  // A small file picker over GET /api/files: the workspace, and any --root folder typed into "Folder".
  async function pickFile(key, input) {
    const list = h("ul", { class: "files" });
    const folder = h("input", { id: "picker-folder", type: "text" });
    const dialog = h("dialog", { class: "picker", "aria-labelledby": "picker-title" },
      h("h2", { id: "picker-title" }, `Choose ${key}`),
      h("form", { class: "row", onsubmit: e => { e.preventDefault(); open(folder.value.trim() || "."); } },
        h("label", { for: "picker-folder" }, "Folder"), folder, h("button", { type: "submit", class: "secondary small" }, "Open")),
      list,
      h("div", { class: "toolbar" },
        h("button", { type: "button", id: "picker-choose-dir", onclick: () => choose(folder.value.trim() || ".") }, "Choose this folder"),
        h("button", { type: "button", class: "secondary", onclick: () => dialog.close() }, "Cancel")));
    dialog.addEventListener("close", () => dialog.remove());
    document.body.append(dialog);
    dialog.showModal();
    function choose(path) {
      input.value = path;
      input.dispatchEvent(new Event("input"));
      dialog.close();
      input.focus();
    }
    async function open(dir) {
      try {
        const answer = await api(`api/files?dir=${encodeURIComponent(dir)}`);
        folder.value = answer.dir;
        // Up stays inside the workspace (relative paths); a root's parent would be refused.
        const up = !answer.dir.startsWith("/") && answer.dir !== "." ? answer.dir.split("/").slice(0, -1).join("/") || "." : null;
        put(list,
          up !== null ? h("li", {}, h("button", { type: "button", class: "link", onclick: () => open(up) }, "⬑ up")) : null,
          answer.entries.map(e => h("li", {}, h("button", { type: "button", class: "link", onclick: () => (e.is_dir ? open(e.path) : choose(e.path)) },
            `${e.is_dir ? "📁 " : ""}${e.name}`), e.is_dir ? null : h("span", { class: "note" }, ` ${fmtBytes(e.size)}`))));
      } catch (error) {
        list.replaceChildren(h("li", {}, errorBox(error)));
      }
    }
    const current = input.value.trim();
    open(current && !current.includes("://") && current.includes("/") ? current.split("/").slice(0, -1).join("/") || "/" : ".");
  }

  if (params.from) {
    try {
      setYaml((await api(runApi(params.from))).recipe_yaml || STARTER);
    } catch (error) {
      generalErrors.replaceChildren(errorBox(error));
      setYaml(STARTER);
    }
  } else if (params.recipe) {
    recipeSelect.value = params.recipe;
    await loadRecipe(params.recipe);
  } else setYaml(STARTER);

  return () => { clearTimeout(timer); clearTimeout(adviseTimer); checkSeq += 1; adviseSeq += 1; };
}

// POST /api/advise's answer: the machine, then per method its trainable share, estimated peak memory (plain and
// with gradient checkpointing), whether it fits, and its time where a finished run of the same model and task
// measured one; the recipe's own method is marked.
function adviseView(answer) {
  const rows = answer.rows || [];
  const fits = r => (!r.applicable ? `n/a${r.reason ? `: ${r.reason}` : ""}` : !r.fits ? "no" : r.needs_checkpointing ? "with checkpointing" : "yes");
  const body = rows.map(r => h("tr", { class: r.chosen ? "chosen" : null },
    h("th", { scope: "row" }, r.method, r.chosen ? " (this recipe)" : ""),
    h("td", { class: "num" }, typeof r.trainable_pct === "number" ? `${fmtNum(r.trainable_pct, 3)} %` : "–"),
    h("td", { class: "num" }, fmtBytes(r.peak_bytes)),
    h("td", { class: "num" }, fmtBytes(r.peak_bytes_checkpointing)),
    h("td", {}, fits(r)),
    h("td", { class: "num", title: r.time ? r.time.basis : null },
      !r.time ? "–" : typeof r.time.seconds === "number" ? fmtDuration(r.time.seconds) : `${fmtNum(r.time.step_s, 3)} s / step`)));
  return h("div", {},
    h("p", {}, `${answer.device || "this machine"}: `, h("strong", {}, fmtBytes(answer.machine_memory)),
      answer.memory_source ? ` (${answer.memory_source})` : "",
      answer.seq_len ? ` · ${answer.seq_len} tokens × batch ${answer.batch}, ${answer.dtype}` : ""),
    rows.length ? h("div", { class: "table-wrap" }, h("table", { class: "advise" },
      h("caption", {}, "Estimated peak memory per method"),
      h("thead", {}, h("tr", {}, ["method", "trainable", "peak memory", "with checkpointing", "fits", "time"].map(c => h("th", { scope: "col" }, c)))),
      h("tbody", {}, body))) : null,
    answer.recommended && answer.recommended.length ? h("p", {}, "Fits and recommended: ", h("strong", {}, answer.recommended.join(", "))) : null,
    answer.time_note ? h("p", { class: "note" }, answer.time_note) : null,
    answer.notes && answer.notes.length ? h("ul", { class: "notes" }, answer.notes.map(n => h("li", {}, n))) : null);
}
