// #/playground/<id>: try a finished run. A causal-LM run chats, tuned and base side by side, each reply streamed
// (POST /api/playground/<id>/chat answers server-sent events, read from the fetch body); a classifier, NER, QA or
// embedding run takes typed inputs and shows what base and tuned predict (POST /api/playground/<id>/predict).

import { api, errorBox, h, pageHref, postEvents, runApi, runPath } from "./api.js";
import { fmtNum } from "./chart.js";

export const NAV = "runs";

// One prediction as a short text, as `tunelab predict` returns it for each task: a classifier's label (and its
// probability), multi-label's labels, a regression's score, NER's entities, QA's answer, an embedding's vector.
function predictionText(p) {
  if (p === null || p === undefined) return "–";
  if (typeof p === "number") return fmtNum(p, 4);
  if (typeof p === "string") return p;
  if (Array.isArray(p)) return p.every(x => typeof x === "number") ? `vector of ${p.length}` : p.map(predictionText).join("; ");
  const score = typeof p.score === "number" ? ` (${fmtNum(p.score, 3)})` : "";
  if ("entities" in p) return p.entities.length ? p.entities.map(predictionText).join("; ") : "(no entities)";
  if ("answer" in p) return p.answer ? `${p.answer}${score}` : "(no answer)";
  if ("labels" in p) return p.labels.length ? p.labels.join(", ") : "(no label)";
  if ("start" in p && "label" in p) return `${p.text} → ${p.label}${score}`;  // an entity
  if ("label" in p) return `${p.label}${score}`;
  if ("score" in p) return fmtNum(p.score, 4);  // regression
  return JSON.stringify(p);
}

function chat(main, id, run) {
  const sides = ["tuned", "base"].map(model => {
    const log = h("div", { class: "chat-log", role: "log", "aria-live": "polite", id: `chat-${model}`, tabindex: "0",
                           "aria-label": `${model} model conversation` });
    return { model, log, history: [], pane: h("section", { class: "chat-pane", "aria-labelledby": `h-${model}` },
                                                h("h2", { id: `h-${model}` }, model === "tuned" ? "Tuned" : "Base"), log) };
  });
  const message = h("textarea", { id: "chat-message", rows: 3, placeholder: "Ask something…",
                                  onkeydown: e => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); form.requestSubmit(); } } });
  const maxTokens = h("input", { id: "chat-max-tokens", type: "number", min: 1, max: 4096, value: "64" });
  const temperature = h("input", { id: "chat-temperature", type: "number", min: 0, max: 2, step: "0.1", value: "0" });
  const send = h("button", { type: "submit", id: "chat-send" }, "Send");
  const problem = h("div", { "aria-live": "polite" });
  const controller = new AbortController();

  async function reply(side, text) {
    side.history.push({ role: "user", content: text });
    side.log.append(h("div", { class: "msg user" }, h("span", { class: "who" }, "you"), h("p", {}, text)));
    const out = h("p", {});
    const bubble = h("div", { class: "msg assistant", "aria-busy": "true" }, h("span", { class: "who" }, side.model), out);
    side.log.append(bubble);
    let answer = "";
    try {
      for await (const event of postEvents(`api/playground/${runPath(id)}/chat`, {
        messages: side.history, model: side.model, max_tokens: Number(maxTokens.value) || 64,
        temperature: Number(temperature.value) || 0,
      }, controller.signal)) {
        if (event.event === "delta") { answer += event.data.text || ""; out.textContent = answer; side.log.scrollTop = side.log.scrollHeight; }
        else if (event.event === "error") throw new Error(event.data.message || String(event.data));
        else if (event.event === "end" && event.data && event.data.finish_reason) bubble.dataset.finish = event.data.finish_reason;
      }
      if (!answer) out.replaceChildren(h("span", { class: "note" }, "(no text: the model ended its reply at once)"));
      side.history.push({ role: "assistant", content: answer });
    } catch (error) {
      if (error.name === "AbortError") return;
      side.history.pop();
      bubble.append(errorBox(error));
    } finally {
      bubble.removeAttribute("aria-busy");
      bubble.dataset.done = "true";
    }
  }

  const form = h("form", { id: "chat-form", class: "chat-form", onsubmit: async e => {
    e.preventDefault();
    const text = message.value.trim();
    if (!text) return;
    message.value = "";
    send.disabled = true;
    problem.replaceChildren();
    await Promise.all(sides.map(side => reply(side, text)));
    send.disabled = false;
    message.focus();
  } },
    h("label", { for: "chat-message" }, "Message (Ctrl+Enter sends)"), message,
    h("div", { class: "row" }, h("label", { for: "chat-max-tokens" }, "Max tokens"), maxTokens,
      h("label", { for: "chat-temperature" }, "Temperature"), temperature, send));
  main.append(h("p", { class: "help" }, `The same conversation goes to the tuned model and to its base (${run.model || "the base model"}); each keeps its own replies.`),
              h("div", { class: "chat" }, sides.map(s => s.pane)), form, problem);
  return () => controller.abort();
}

function predict(main, id, run) {
  const pairs = run.task === "qa" || !!(run.config && run.config.data && run.config.data.text_pair_field);
  const embed = run.playground === "embed";
  const inputs = h("textarea", { id: "predict-inputs", rows: 5, placeholder: "one input per line" });
  const second = pairs ? h("textarea", { id: "predict-pairs", rows: 5, placeholder: "one per line, beside each input" }) : null;
  const result = h("div", { id: "predict-result", "aria-live": "polite" });
  const button = h("button", { type: "submit", id: "predict-button" }, embed ? "Embed and compare" : "Predict");
  const firstLabel = run.task === "qa" ? "Questions, one per line" : embed ? "Texts, one per line (each pair of texts gets a similarity)" : "Inputs, one per line";
  const secondLabel = run.task === "qa" ? "Contexts, one per line (the passage each question is answered from)" : "Second texts, one per line";

  async function go(event) {
    event.preventDefault();
    const lines = inputs.value.split("\n").map(s => s.trim()).filter(Boolean);
    if (!lines.length) { result.replaceChildren(errorBox("Type at least one input.")); return; }
    const others = second ? second.value.split("\n").map(s => s.trim()).filter(Boolean) : null;
    button.disabled = true;
    result.replaceChildren(h("p", { class: "note" }, "predicting…"));
    try {
      if (others && others.length !== lines.length) throw new Error(`${lines.length} inputs and ${others.length} second texts: give one of each per line.`);
      // A QA run answers {question, context} items; a pair classifier takes its second texts as pairs.
      const body = run.task === "qa" ? { inputs: lines.map((q, i) => ({ question: q, context: others[i] })), pairs: null }
                                     : { inputs: lines, pairs: others };
      const answer = await api(`api/playground/${runPath(id)}/predict`, { method: "POST", body });
      result.replaceChildren(predictView(lines, answer));
    } catch (error) {
      result.replaceChildren(errorBox(error));
    } finally {
      button.disabled = false;
    }
  }
  main.append(h("form", { id: "predict-form", onsubmit: go },
    h("label", { for: "predict-inputs" }, firstLabel), inputs,
    second ? h("label", { for: "predict-pairs" }, secondLabel) : null, second, button), result);
  return null;
}

function predictView(lines, answer) {
  const parts = [];
  const tuned = answer.tuned || [], base = answer.base;
  if (tuned.length === lines.length) {
    parts.push(h("div", { class: "table-wrap" }, h("table", { class: "predictions" },
      h("caption", {}, "Predictions"),
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "input"), base ? h("th", { scope: "col" }, "base") : null, h("th", { scope: "col" }, "tuned"))),
      h("tbody", {}, lines.map((line, i) => h("tr", {}, h("th", { scope: "row" }, line),
        base ? h("td", {}, predictionText(base[i])) : null, h("td", { class: "tuned" }, predictionText(tuned[i]))))))));
  }
  if (!base && answer.base_reason) parts.push(h("p", { class: "note", id: "base-reason" }, `No base predictions: ${answer.base_reason}`));
  if (answer.similarities) {
    for (const [model, matrix] of Object.entries(answer.similarities)) {
      if (!Array.isArray(matrix)) continue;
      parts.push(h("div", { class: "table-wrap" }, h("table", { class: "similarity" },
        h("caption", {}, `Cosine similarity (${model})`),
        h("thead", {}, h("tr", {}, h("td", {}), lines.map(l => h("th", { scope: "col" }, l)))),
        h("tbody", {}, matrix.map((row, i) => h("tr", {}, h("th", { scope: "row" }, lines[i] ?? String(i)),
          (Array.isArray(row) ? row : [row]).map(v => h("td", { class: "num" }, fmtNum(v, 3)))))))));
    }
  }
  return h("div", {}, parts);
}

export async function render(main, { id }) {
  const run = await api(runApi(id));
  main.append(h("p", { class: "crumbs" }, h("a", { href: "#/runs" }, "Runs"), " / ", h("a", { href: pageHref("run", id) }, id)),
              h("h1", {}, `Playground: ${run.name || id}`),
              h("p", { class: "meta" }, [run.task, run.method, run.model].filter(Boolean).join(" · ")));
  if (!run.playground) {
    main.append(errorBox(`Run '${id}' cannot be tried here: ${run.status !== "finished" ? "it has not finished" : `the playground does not take ${run.task} runs`}.`));
    return null;
  }
  return run.playground === "chat" ? chat(main, id, run) : predict(main, id, run);
}
