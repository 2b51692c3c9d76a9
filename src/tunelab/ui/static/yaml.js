// Editing a recipe's YAML text one dotted key at a time, so the YAML stays the source of truth: a form edit
// rewrites only the line of the key it names (or adds it under its section), and the user's comments, order and
// other keys are left as they were. Parsing YAML back is the server's job (POST /api/validate answers the
// resolved config); this file only needs the block-mapping layout recipes are written in.

const KEY = /^(\s*)([^\s#'"-][^:#]*?|"[^"]*"|'[^']*'):(?:\s+(.*))?$/;
const RESERVED = /^(true|false|yes|no|on|off|null|~|y|n)$/i;
const NUMERIC = /^[-+]?(\d|\.\d)|^[-+]?\.?(inf|nan)$/i;

const unquote = k => (/^(".*"|'.*')$/.test(k) ? k.slice(1, -1) : k);
const indentOf = line => line.length - line.trimStart().length;
const blank = line => !line.trim() || line.trimStart().startsWith("#");

// A value as YAML: plain where that reads back as the same string, else double-quoted (JSON is valid YAML).
function formatValue(value) {
  if (value === null || value === undefined) return "null";
  if (typeof value === "boolean") return String(value);
  if (typeof value === "number") {
    // PyYAML reads 1e-05 as a string; 1.0e-05 is a float.
    const text = String(value);
    return /e/i.test(text) && !text.includes(".") ? text.replace(/e/i, ".0e") : text;
  }
  if (Array.isArray(value)) return `[${value.map(formatValue).join(", ")}]`;
  if (typeof value === "object") return JSON.stringify(value);
  const s = String(value);
  const plain = /^[A-Za-z0-9_./~+@][A-Za-z0-9_ ./~+@=-]*$/.test(s) && !/\s$/.test(s) && !RESERVED.test(s)
                && !NUMERIC.test(s);
  return plain ? s : JSON.stringify(s);
}

// The line index one past a key's block: its more-indented lines, and a list written at its own indent.
function blockEnd(lines, at, indent, end) {
  let j = at + 1;
  while (j < end && (blank(lines[j]) || indentOf(lines[j]) > indent
                     || (indentOf(lines[j]) === indent && lines[j].trimStart().startsWith("- ")))) j += 1;
  while (j > at + 1 && blank(lines[j - 1])) j -= 1;  // trailing blank lines and comments belong to what follows
  return j;
}

function findKey(lines, key, start, end, indent) {
  for (let i = start; i < end; i += 1) {
    if (blank(lines[i]) || indentOf(lines[i]) !== indent) continue;
    const m = KEY.exec(lines[i]);
    if (m && unquote(m[2].trim()) === key) return i;
  }
  return -1;
}

function childIndent(lines, start, end, indent) {
  for (let i = start; i < end; i += 1) if (!blank(lines[i])) return indentOf(lines[i]);
  return indent + 2;
}

// Where `dotted` lies: {found: line index | -1, path walked so far, range to insert into}.
function locate(lines, parts) {
  let start = 0, end = lines.length, indent = childIndent(lines, 0, lines.length, -2);
  for (let depth = 0; depth < parts.length; depth += 1) {
    const at = findKey(lines, parts[depth], start, end, indent);
    if (at < 0) return { at: -1, depth, start, end, indent };
    if (depth === parts.length - 1) return { at, depth, start, end: blockEnd(lines, at, indent, end), indent };
    const stop = blockEnd(lines, at, indent, end);
    const m = KEY.exec(lines[at]);
    if (m[3] && !m[3].startsWith("#")) {
      // `key: scalar` where a section is needed: the section replaces the scalar.
      lines[at] = `${" ".repeat(indent)}${m[2]}:`;
    }
    start = at + 1;
    end = stop;
    indent = childIndent(lines, start, end, indent);
  }
  return { at: -1, depth: parts.length, start, end, indent };
}

function trailingComment(line) {
  const m = /\s+#.*$/.exec(line);
  return m && !/["']/.test(line.slice(line.indexOf(":") + 1)) ? m[0] : "";
}

export function setKey(text, dotted, value) {
  const lines = text.split("\n");
  if (lines.length && lines[lines.length - 1] === "") lines.pop();
  const parts = dotted.split(".");
  const spot = locate(lines, parts);
  if (spot.at >= 0) {
    const m = KEY.exec(lines[spot.at]);
    lines.splice(spot.at, spot.end - spot.at,
                 `${m[1]}${m[2]}: ${formatValue(value)}${trailingComment(lines[spot.at])}`);
  } else {
    let insertAt = spot.end;
    while (insertAt > spot.start && blank(lines[insertAt - 1])) insertAt -= 1;
    const added = parts.slice(spot.depth).map((key, i, rest) => {
      const pad = " ".repeat(spot.indent + 2 * i);
      return i === rest.length - 1 ? `${pad}${key}: ${formatValue(value)}` : `${pad}${key}:`;
    });
    lines.splice(insertAt, 0, ...added);
  }
  return `${lines.join("\n")}\n`;
}

// Removes a key (and its block); a section left empty goes too, so an unset option leaves no trace.
export function deleteKey(text, dotted) {
  const lines = text.split("\n");
  if (lines.length && lines[lines.length - 1] === "") lines.pop();
  const parts = dotted.split(".");
  const spot = locate(lines.slice(), parts);
  if (spot.at < 0) return text;
  lines.splice(spot.at, spot.end - spot.at);
  let out = `${lines.join("\n")}\n`;
  if (parts.length > 1) {
    const parent = parts.slice(0, -1).join(".");
    const again = out.split("\n");
    again.pop();
    const where = locate(again.slice(), parts.slice(0, -1));
    if (where.at >= 0 && where.end === where.at + 1 && /:\s*(#.*)?$/.test(again[where.at])) out = deleteKey(out, parent);
  }
  return out;
}

// A key's scalar as written (quotes taken off, a trailing comment dropped), or undefined when it is absent or not a
// plain scalar. For what the form shows before the server has resolved a recipe that does not validate yet.
export function getKey(text, dotted) {
  const lines = text.split("\n");
  const spot = locate(lines, dotted.split("."));
  if (spot.at < 0) return undefined;
  const raw = (KEY.exec(lines[spot.at])[3] || "").replace(/\s+#.*$/, "").trim();
  if (!raw || /^[[{|>&*!]/.test(raw)) return undefined;
  return unquote(raw);
}
