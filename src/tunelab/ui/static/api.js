// Talking to the `tunelab ui` backend: JSON calls with its one-paragraph errors, run ids in URLs, a reader for
// server-sent events that arrive as the body of a POST (the playground's chat), and small DOM helpers the pages
// share. Every URL is relative, so the app works behind a path prefix too.

export class ApiError extends Error {
  constructor(status, message, field = null) {
    super(message);
    Object.assign(this, { status, field });
  }
}

// The backend answers errors as {"error": {"message", "field"}}; FastAPI's own 422s as {"detail": [...]}.
function errorOf(status, data, what) {
  if (data && data.error) return new ApiError(status, data.error.message || what, data.error.field ?? null);
  if (data && data.detail) {
    const detail = Array.isArray(data.detail) ? data.detail.map(d => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ")
                                              : String(data.detail);
    return new ApiError(status, detail);
  }
  return new ApiError(status, `${what} failed with HTTP ${status}.`);
}

export async function api(path, { method = "GET", body, signal } = {}) {
  const init = { method, signal, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!response.ok) throw errorOf(response.status, data, `${method} ${path}`);
  return data;
}

// Run ids are '/'-separated paths relative to the workspace; each segment is escaped, the slashes kept.
export const runPath = id => id.split("/").map(encodeURIComponent).join("/");
export const pageHref = (page, id) => `#/${page}/${runPath(id)}`;
export const runApi = (id, suffix = "") => `api/runs/${runPath(id)}${suffix}`;

// POST a JSON body and yield the server-sent events of the streamed answer as {event, data} (data parsed as JSON
// where it is JSON). EventSource only does GET, so the chat reads the body with a stream reader.
export async function* postEvents(path, body, signal) {
  const response = await fetch(path, {
    method: "POST", signal, credentials: "same-origin",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream" }, body: JSON.stringify(body),
  });
  if (!response.ok) {
    let data = null;
    try { data = await response.json(); } catch { data = null; }
    throw errorOf(response.status, data, `POST ${path}`);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const event = parseEvent(block);
      if (event) yield event;
    }
  }
}

function parseEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  const text = data.join("\n");
  try { return { event, data: JSON.parse(text) }; } catch { return { event, data: text }; }
}

// h("p", {class: "note"}, "text", child, ...) -> an element. Attributes starting with "on" become listeners;
// null/false attributes and children are skipped, so optional parts can be written inline.
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false || k === "value") continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else if (k in node && typeof v !== "string") node[k] = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  if (attrs && attrs.value !== undefined && attrs.value !== null) node.value = attrs.value;  // after a <select>'s options
  return node;
}

// node's children replaced by these, the null / false ones left out (replaceChildren would write "null").
export function put(node, ...children) {
  node.replaceChildren(...children.flat().filter(c => c !== null && c !== undefined && c !== false));
  return node;
}

// A table from a header row and body rows (cells: strings, numbers or nodes); the first column is a row header.
export function table(headers, rows, { caption, className } = {}) {
  return h("table", { class: className },
    caption ? h("caption", {}, caption) : null,
    h("thead", {}, h("tr", {}, headers.map(c => h("th", { scope: "col" }, c)))),
    h("tbody", {}, rows.map(r => h("tr", {}, r.map((c, i) => h(i ? "td" : "th", i ? {} : { scope: "row" }, c))))));
}

export function fmtBytes(n) {
  if (typeof n !== "number") return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(n >= 100 || i === 0 ? 0 : 1)} ${units[i]}`;
}

export function fmtDuration(s) {
  if (typeof s !== "number" || !Number.isFinite(s)) return "–";
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  const m = Math.floor(s / 60), sec = Math.round(s % 60);
  if (m < 60) return `${m} min ${sec} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

export function fmtTime(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleString("en-GB", { dateStyle: "medium", timeStyle: "short" });
}

// One status badge, the same everywhere (text, not colour alone, carries the status).
export const badge = status => h("span", { class: `badge badge-${status}` }, status || "unknown");

// An error for the page: the server's own paragraph as it is; anything else (a bug, a dropped connection) also
// goes to the console, where the browser tests look for it.
export function errorBox(error) {
  if (!(error instanceof ApiError) && typeof error !== "string") console.error(error);
  return h("div", { class: "error", role: "alert" }, error instanceof Error ? error.message : String(error));
}
