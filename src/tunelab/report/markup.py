"""HTML primitives of a report page, and how values read in its cells.

Everything that comes from the user's data or files goes through `esc` (labels and texts may hold markup). A
section whose builder fails becomes a note (`part`), never an exception: the report is written at the end of a
run and must not fail it.
"""

from __future__ import annotations

import html
import json
import math

COUNTERS = ("examples", "target_tokens", "tokens", "support")  # sizes, not scores: no table row, no curve
LOWER_IS_BETTER = ("loss", "perplexity", "mse", "rmse", "mae")
CLIP = 300  # characters of a sample field shown

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d232a;
       max-width: 1180px; margin: 1.5em auto; padding: 0 1em; background: #fff; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { border-bottom: 1px solid #d5dbe1; padding-bottom: .2em;
margin-top: 1.8em; } h3 { margin: 1.2em 0 .4em; }
table { border-collapse: collapse; margin: .5em 0 1em; } caption { text-align: left; color: #56606b; padding: .2em 0; }
th, td { border: 1px solid #d5dbe1; padding: .25em .6em; vertical-align: top; text-align: left; }
th { background: #f1f4f7; font-weight: 600; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.better { color: #12703a; font-weight: 600; } td.worse { color: #b3261e; font-weight: 600; }
td.text { white-space: pre-wrap; max-width: 32em; word-break: break-word; font-size: .93em; }
td.reason { color: #6b5200; }
pre { background: #f6f8fa; border: 1px solid #d5dbe1; padding: .8em; overflow-x: auto; font-size: .88em; }
img { max-width: 100%; height: auto; display: block; margin: .4em 0 1em; }
.wide { overflow-x: auto; } .wide table { font-size: .92em; }
.note { color: #56606b; font-style: italic; } .sub { color: #56606b; margin-top: 0; }
"""


# -- HTML -------------------------------------------------------------------------------

def page(title: str, body: str) -> str:
    return (f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{esc(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")


def part(title: str, build, *args) -> str:
    """A section; a builder that fails leaves a note, not a missing report (None: the section does not apply)."""
    try:
        content = build(*args)
    except Exception as e:  # noqa: BLE001 - the rest of the page is still worth having
        content = note(f"This section could not be drawn: {type(e).__name__}: {e}")
    if content is None:
        return ""
    return f"<section><h2>{esc(title)}</h2>\n{content}\n</section>"


def table(head: list, rows: list[list], caption: str | None = None) -> str:
    body = ["".join(num(v) if scalar(v) else td(text(v)) for v in row) for row in rows]
    return raw_table(head, body, caption)


def raw_table(head: list, rows: list[str], caption: str | None = None) -> str:
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    return f"<table>{cap}<thead><tr>{th}</tr></thead><tbody>" + "".join(f"<tr>{r}</tr>" for r in rows) + "</tbody></table>"


def kv_table(pairs: list[tuple]) -> str:
    return "<table><tbody>" + "".join(f"<tr><th>{esc(k)}</th>{td(text(v))}</tr>" for k, v in pairs) + "</tbody></table>"


def td(value, cls: str | None = None, th: bool = False) -> str:
    tag = "th" if th else "td"
    attr = f" class='{cls}'" if cls else ""
    return f"<{tag}{attr}>{esc(value)}</{tag}>"


def num(value, spec: str | None = None) -> str:
    return td(fixed(value, spec) if spec else fmt(value), cls="num")


def fixed(value, spec: str) -> str:
    return format(value, spec) if scalar(value) else "–"


def cell(value) -> str:
    return td(clip(text(value), CLIP), cls="text")


def change(before, after, metric: str) -> str:
    if not (scalar(before) and scalar(after)) or not (math.isfinite(before) and math.isfinite(after)):
        return td("–", cls="num")
    diff = after - before
    if abs(diff) < 5e-5:  # below the 4 decimals shown: no change, not a win
        return td("0", cls="num")
    good = diff < 0 if lower_is_better(metric) else diff > 0
    return td(f"{diff:+.4f}" if abs(diff) < 1000 else f"{diff:+,.1f}", cls=f"num {'better' if good else 'worse'}")


def note(text: str) -> str:
    return f"<p class='note'>{esc(text)}</p>"


def pre(text: str) -> str:
    return f"<pre>{esc(text)}</pre>"


def esc(value) -> str:
    return html.escape(str(value), quote=True)


# -- values -----------------------------------------------------------------------------

def fmt(v) -> str:
    """4 decimals for scores, thousands separators for counts, scientific for learning rates."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.2e}"
        return f"{v:,.1f}" if abs(v) >= 1000 else f"{v:.4f}"
    return str(v)


def pct(v) -> str:
    return "–" if not scalar(v) else f"{v:.2f}%" if v >= 0.01 else f"{v:.2e}%"


def unit(v, unit: str) -> str | None:
    if not scalar(v):
        return None
    return (f"{v:,.1f}" if abs(v) >= 10 else f"{v:.2f}") + (f" {unit}" if unit else "")


def text(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, ensure_ascii=False)
    return fmt(v)


def clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def mpl(s: str) -> str:
    """Text for matplotlib: a '$' pair would start mathtext, and a bad formula there raises while drawing."""
    return str(s).replace("$", r"\$")


def scalar(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def counter(metric: str) -> bool:
    return metric.rsplit("/", 1)[-1] in COUNTERS


def lower_is_better(metric: str) -> bool:
    name = metric.rsplit("/", 1)[-1]
    return name in LOWER_IS_BETTER or name.endswith("loss")


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested counts as dotted keys; a big dict (hundreds of labels) stays one cell rather than hundreds of rows."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and 0 < len(v) <= 12:
            out.update(flatten(v, key + "."))
        else:
            out[key] = clip(text(v), CLIP) if isinstance(v, (dict, list)) else v
    return out


def union(iterables) -> list:
    """Keys in first-seen order."""
    seen: dict = {}
    for it in iterables:
        for k in it:
            seen.setdefault(k, None)
    return list(seen)


def as_dict(v) -> dict:
    return v if isinstance(v, dict) else {}


def as_list(v) -> list:
    return v if isinstance(v, list) else []
