"""HTML reports built only from what a finished run directory holds.

`write_run(run_dir)`  -> run_dir/report.html: base vs tuned, forgetting, curves, confusion matrix, samples,
                         data report, config.
`write_compare(out_dir, rows)` -> out_dir/report.html: what each method of `tunelab compare` cost and gained.

A page is one self-contained file: no script, no external CSS or font; plots are matplotlib figures drawn
with Agg and embedded as base64 PNG, so the page opens offline, from an archive or an attachment. Every
optional input that is missing or unreadable becomes a note in its section, never an exception: the report
is written at the end of a run and must not fail it. Everything that comes from the user's data or files is
HTML-escaped (labels and texts may hold markup).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from urllib.parse import quote

# The object-oriented API, not pyplot: no global backend switch (a notebook importing tunelab keeps its own)
# and no figure registry to leak from.
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, MaxNLocator

from .. import atomic
from ..errors import TunelabError

COUNTERS = ("examples", "target_tokens", "tokens", "support")  # sizes, not scores: no table row, no curve
LOWER_IS_BETTER = ("loss", "perplexity", "mse", "rmse", "mae")
# Sample fields a model writes: shown before and after even where training did not change them.
OUTPUT_FIELDS = ("label", "score", "predicted", "prediction", "generated", "generation", "output", "answer")
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


# -- one run -----------------------------------------------------------------------

def write_run(run_dir) -> Path:
    """Write run_dir/report.html from the run's files; returns its path."""
    run_dir = Path(run_dir)
    summary = _read_summary(run_dir)
    multi = isinstance(summary.get("tasks"), dict)
    title = f"{summary.get('method', '?')} on {summary.get('task', '?')}"
    records, bad_lines = _read_records(run_dir / "metrics.jsonl")
    body = [
        f"<h1>{_esc(title)}</h1>",
        f"<p class='sub'>model {_esc(summary.get('model', '?'))} &middot; run {_esc(run_dir.resolve())}</p>",
        _part("Run", _facts, summary),
        _part("Base vs tuned", _multitask_scores if multi else _scores, summary),
        _part("Forgetting", _forgetting, summary) if "forgetting" in summary else "",
        _part("Confusion matrix", _confusion, summary, multi),
        _part("Training curves", _curves, records, bad_lines),
        _part("Samples", _samples, run_dir / "samples.json"),
        _part("Data", _data, run_dir / "data_report.json"),
        _part("Config", _config, run_dir / "config.yaml"),
    ]
    out = run_dir / "report.html"
    atomic.write_text(out, _page(title, "\n".join(body)), "the report")
    return out


def _read_summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    if not path.is_file():
        raise TunelabError(f"'{run_dir}' has no summary.json, so it is not a finished tunelab run (a run writes it "
                           f"last). Point the report at the run's output_dir, or re-run `tunelab train`.")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TunelabError(f"'{path}' could not be read as JSON ({e}); was it edited or cut short? "
                           f"Re-run `tunelab train` to write it again.") from e
    if not isinstance(summary, dict):
        raise TunelabError(f"'{path}' holds a {type(summary).__name__}, not the object a run writes. "
                           f"Re-run `tunelab train` to write it again.")
    return summary


def _facts(summary: dict) -> str:
    s = summary.get
    trainable = s("trainable_params")
    rows = [
        ("method", s("method")), ("task", s("task")),
        ("tasks", ", ".join(f"{n} ({t})" for n, t in s("tasks").items()) if isinstance(s("tasks"), dict) else None),
        ("model", s("model")),
        ("trainable parameters", None if trainable is None else
         f"{_fmt(trainable)} of {_fmt(s('total_params'))} ({_pct(s('trainable_percent'))})"),
        ("train time", _unit(s("train_seconds"), "s")), ("tokens / s", _unit(s("tokens_per_second"), "")),
        ("train tokens", _fmt(s("train_tokens")) if s("train_tokens") is not None else None),
        ("peak memory", _unit(s("peak_memory_mb"), "MB")),
        ("steps", s("steps")), ("best step", s("best_step")), ("stopped early", s("stopped_early")),
        ("best metric", ", ".join(f"{k} {_fmt(v)}" for k, v in s("metric").items()) if isinstance(s("metric"), dict) else s("metric")),
        ("saved", f"{s('artifact')}/ ({_fmt(s('artifact_mb'))} MB)" if s("artifact") else None),
        ("task sampling", s("sampling")),
        ("task weights", ", ".join(f"{n} {_fmt(w)}" for n, w in s("weights").items()) if isinstance(s("weights"), dict) else None),
        ("wall time", _unit(s("wall_seconds"), "s")), ("device", s("device")), ("torch", s("torch")),
    ]
    table = _kv_table([(k, v) for k, v in rows if v is not None])
    groups = s("optimizer_groups")
    if isinstance(groups, list) and groups and all(isinstance(g, dict) for g in groups):
        keys = _union(g.keys() for g in groups)
        table += _table(keys, [[g.get(k) for k in keys] for g in groups], caption="optimizer parameter groups")
    return table


def _scores(summary: dict) -> str:
    tuned = {"validation": summary.get("eval"), "test": summary.get("test")}
    return _score_table(_dict(summary.get("base")), _dict(summary.get("linear_probe")), tuned)


def _multitask_scores(summary: dict) -> str:
    base, evals, tests = _dict(summary.get("base")), _dict(summary.get("eval")), _dict(summary.get("test"))
    parts = []
    for name, kind in summary["tasks"].items():
        parts.append(f"<h3>{_esc(name)} <span class='note'>({_esc(kind)})</span></h3>")
        parts.append(_score_table(_dict(base.get(name)), {}, {"validation": evals.get(name), "test": tests.get(name)}))
    return "".join(parts)


def _score_table(base: dict, probe: dict, tuned: dict) -> str:
    """Per split and scalar metric: base, linear probe (when there is one), tuned, and tuned − base."""
    splits = _union([["validation", "test"], base, probe])
    head = ["split", "metric", "base"] + (["linear probe"] if probe else []) + ["tuned", "change"]
    rows = []
    for split in splits:
        t, b, p = _dict(tuned.get(split)), _dict(base.get(split)), _dict(probe.get(split))
        metrics = [m for m in _union([t, b, p]) if not _counter(m) and any(_scalar(d.get(m)) for d in (t, b, p))]
        n = t.get("examples", b.get("examples"))
        label = f"{split} (n={_fmt(n)})" if _scalar(n) else split
        for i, m in enumerate(metrics):
            cells = [_td(label if i == 0 else "", th=True), _td(m), _num(b.get(m))]
            cells += [_num(p.get(m))] if probe else []
            cells += [_num(t.get(m)), _change(b.get(m), t.get(m), m)]
            rows.append("".join(cells))
    if not rows:
        return _note("summary.json holds no scalar metric to compare.")
    return _raw_table(head, rows)


def _forgetting(summary: dict) -> str:
    f = summary["forgetting"]
    if not isinstance(f, dict):
        return _note("summary.json's forgetting entry is not an object.")
    better = "lower" if _lower_is_better(str(f.get("metric", ""))) else "higher"
    what = (f"{f.get('metric', '?')} on {f.get('file', '?')} ({f.get('kind', '?')}), measured before and after "
            f"training; change = after − before, {better} is better")
    head = ["kind", "metric", "file", "before", "after", "change"]
    row = [_td(f.get("kind")), _td(f.get("metric")), _td(f.get("file")), _num(f.get("before")), _num(f.get("after")),
           _change(f.get("before"), f.get("after"), str(f.get("metric", "")))]
    return f"<p>{_esc(what)}.</p>" + _raw_table(head, ["".join(row)])


def _confusion(summary: dict, multi: bool) -> str | None:
    """The test split's matrix, else validation's; per task for a multi-task run. None: no matrix to draw."""
    if multi:
        found = [(name, *_pick_matrix(_dict(_dict(summary.get("test")).get(name)), _dict(_dict(summary.get("eval")).get(name))))
                 for name in summary["tasks"]]
    else:
        found = [(None, *_pick_matrix(_dict(summary.get("test")), _dict(summary.get("eval"))))]
    found = [f for f in found if f[1] is not None]
    if not found:
        return None
    parts = []
    for name, matrix, split in found:
        heading = f"{name}: {split} split" if name else f"{split} split"
        parts.append(f"<h3>{_esc(heading)}</h3>" + _img(_confusion_figure(matrix), f"confusion matrix, {heading}"))
    return "".join(parts)


def _pick_matrix(test: dict, val: dict):
    for split, metrics in (("test", test), ("validation", val)):
        cm = metrics.get("confusion_matrix")
        if isinstance(cm, dict) and cm.get("labels") and cm.get("rows_true_cols_pred"):
            return cm, split
    return None, None


def _confusion_figure(cm: dict) -> Figure:
    labels = [str(x) for x in cm["labels"]]
    counts = cm["rows_true_cols_pred"]
    k = len(labels)
    if len(counts) != k or any(len(r) != k for r in counts):
        raise ValueError(f"a {len(counts)}-row confusion matrix for {k} labels")
    side = min(2.2 + 0.55 * k, 14)
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(counts, cmap="Blues")
    fig.colorbar(im, ax=ax, shrink=0.8)
    names = [_mpl(_clip(x, 24)) for x in labels]
    ax.set_xticks(range(k), names, rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:  # beyond that the numbers no longer fit their cells
        top = max(max(r) for r in counts) or 1
        for i, row in enumerate(counts):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=9, color="white" if v > top / 2 else "#1d232a")
    return fig


def _curves(records: list[dict] | None, bad_lines: int) -> str:
    if records is None:
        return _note("No metrics.jsonl in this run: no training curves.")
    parts = [_note(f"{bad_lines} line(s) of metrics.jsonl could not be read and were skipped.")] if bad_lines else []
    train = [r for r in records if r.get("type") == "train" and _scalar(r.get("step"))]
    val = [r for r in records if r.get("type") == "eval" and r.get("split") == "validation" and _scalar(r.get("step"))]
    # A multi-task run logs one test record per task, with plain metric names; its curves are named task/metric.
    test = [{(f"{r['task']}/{k}" if "task" in r and k != "step" else k): v for k, v in r.items()}
            for r in records if r.get("type") == "eval" and r.get("split") == "test"]
    events = [r for r in records if r.get("type") in ("unfreeze", "plateau") and _scalar(r.get("step"))]
    if any(_scalar(r.get("loss")) for r in train):
        parts.append(_img(_loss_figure(train, events), "training loss vs step"))
    else:
        parts.append(_note("metrics.jsonl holds no training loss."))
    metrics = [m for m in _union(val) if m not in ("step", "epoch") and not _counter(m)
               and any(_scalar(r.get(m)) for r in val)]
    if metrics:
        parts.append(_img(_validation_figure(val, test, metrics), "validation metrics vs step"))
    else:
        parts.append(_note("metrics.jsonl holds no validation evaluation."))
    if any(isinstance(r.get("lrs"), dict) or _scalar(r.get("lr")) for r in train):
        parts.append(_img(_lr_figure(train), "learning rate vs step"))
    return "".join(parts)


def _loss_figure(train: list[dict], events: list[dict]) -> Figure:
    fig = Figure(figsize=(8, 3.2), layout="constrained")
    ax = fig.subplots()
    pts = [(r["step"], r["loss"]) for r in train if _scalar(r.get("loss"))]
    ax.plot(*zip(*pts), color="#1f6fb2", lw=1.4, marker="." if len(pts) < 60 else None)
    for e in events:  # a schedule change explains a bend in the curve
        ax.axvline(e["step"], color="#999", ls=":", lw=1)
        what = e.get("unfrozen") if e.get("type") == "unfreeze" else f"lr x{_fmt(e.get('lr_scale'))}"
        ax.annotate(_mpl(_clip(str(what), 20)), (e["step"], 1), xycoords=("data", "axes fraction"), fontsize=7,
                    rotation=90, va="top", ha="right", color="#666")
    ax.set(xlabel="step", ylabel="loss", title="training loss")
    _step_axis(ax)
    return fig


def _validation_figure(val: list[dict], test: list[dict], metrics: list[str]) -> Figure:
    """Small multiples, one per metric: each has its own scale (loss and accuracy do not share an axis)."""
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(3.7 * cols, 2.7 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, m in zip(axes, metrics):
        pts = [(r["step"], r[m]) for r in val if _scalar(r.get(m))]
        ax.plot(*zip(*pts), marker="o", ms=3, lw=1.3, color="#1f6fb2", label="validation")
        tpts = [(r["step"], r[m]) for r in test if _scalar(r.get(m)) and _scalar(r.get("step"))]
        if tpts:
            ax.plot(*zip(*tpts), ls="none", marker="*", ms=9, color="#d9822b", label="test")
            ax.legend(fontsize=7)
        ax.set_title(_mpl(m), fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        _step_axis(ax)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    return fig


def _lr_figure(train: list[dict]) -> Figure:
    series: dict[str, list] = {}
    for r in train:
        lrs = r.get("lrs") if isinstance(r.get("lrs"), dict) else {"lr": r.get("lr")}
        for name, v in lrs.items():
            if _scalar(v):
                series.setdefault(str(name), []).append((r["step"], v))
    # Groups that follow one schedule would draw one line over another: one line, all their names.
    merged: dict[tuple, list[str]] = {}
    for name, pts in series.items():
        merged.setdefault(tuple(pts), []).append(name)
    fig = Figure(figsize=(8, 2.8), layout="constrained")
    ax = fig.subplots()
    for pts, names in merged.items():
        ax.plot(*zip(*pts), lw=1.4, marker="." if len(pts) < 60 else None, label=_mpl(_clip(", ".join(names), 60)))
    positive = [v for pts in merged for _, v in pts if v > 0]
    if positive and max(positive) / min(positive) > 100:  # layer-wise rates spread over decades
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax.legend(fontsize=8)
    _step_axis(ax)
    return fig


def _samples(path: Path) -> str:
    if not path.is_file():
        return _note("No samples.json in this run (multi-task runs, and runs with eval.samples=0, write none).")
    data = _read_json(path)
    if not isinstance(data, dict):
        return _note("samples.json is not an object with 'before' and 'after' lists.")
    before, after = _list(data.get("before")), _list(data.get("after"))
    if not before and not after:
        return _note("samples.json holds no example.")
    pairs = [(_dict(before[i]) if i < len(before) else {}, _dict(after[i]) if i < len(after) else {})
             for i in range(max(len(before), len(after)))]
    # Dicts (e.g. every class's probability) do not read well in a cell; everything else is shown.
    fields = [f for f in _union(d for pair in pairs for d in pair)
              if not any(isinstance(d.get(f), dict) for pair in pairs for d in pair)]
    shared = [f for f in fields if f not in OUTPUT_FIELDS and all(b.get(f) == a.get(f) for b, a in pairs)]
    changed = [f for f in fields if f not in shared]
    head = shared + [f"{f} {when}" for f in changed for when in ("before", "after")]
    rows = []
    for b, a in pairs:
        cells = [_cell(b.get(f, a.get(f))) for f in shared]
        cells += [_cell(d.get(f)) for f in changed for d in (b, a)]
        rows.append("".join(cells))
    return (f"<p>The first {len(pairs)} validation example(s), scored by the model before and after training; "
            f"fields are cut at {CLIP} characters.</p>" + _raw_table(head, rows))


def _data(path: Path) -> str:
    if not path.is_file():
        return _note("No data_report.json in this run.")
    report = _read_json(path)
    if isinstance(report, dict) and isinstance(report.get("splits"), dict):
        return _data_one(report)
    if isinstance(report, dict) and report and all(isinstance(v, dict) and isinstance(v.get("splits"), dict)
                                                   for v in report.values()):
        return "".join(f"<h3>{_esc(name)}</h3>" + _data_one(r) for name, r in report.items())
    return _pre(json.dumps(report, indent=2, ensure_ascii=False))


def _data_one(report: dict) -> str:
    """One table of the splits side by side, a row per count; the rest (files, split settings) as key / value."""
    splits = {name: _flatten(s) if isinstance(s, dict) else {"": s} for name, s in report["splits"].items()}
    keys = _union(splits.values())
    table = _table(["", *splits], [[k, *(s.get(k) for s in splits.values())] for k in keys], caption="per split")
    rest = _flatten({k: v for k, v in report.items() if k != "splits"})
    return (_kv_table(list(rest.items())) if rest else "") + table


def _config(path: Path) -> str:
    if not path.is_file():
        return _note("No config.yaml in this run.")
    return "<p>The resolved config, as the run saved it.</p>" + _pre(path.read_text(encoding="utf-8", errors="replace"))


# -- a comparison of methods -----------------------------------------------------------

def write_compare(out_dir, rows: list[dict], title: str | None = None) -> Path:
    """Write out_dir/report.html for `tunelab compare`; returns its path.

    A row per method: {"method", "status": "ok" | "skipped", "reason", "run_dir", "lr", "trainable_params",
    "total_params", "trainable_percent", "storage_mb", "peak_memory_mb", "memory_kind": "rss" | "cuda",
    "train_seconds", "tokens_per_second", "latency_ms", "latency_merged_ms" (None: cannot merge), "metric",
    "split", "tuned", "base", "linear_probe", "forgetting": None | {"kind", "metric", "file", "before", "after",
    "change"}}; a skipped row needs only method, status and reason. Each run's own report.html is linked (and
    written, where the run has none yet)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = title or "tunelab compare"
    ok = [r for r in rows if r.get("status") == "ok"]
    body = [f"<h1>{_esc(title)}</h1>", _part("Methods", _compare_table, rows, out_dir)]
    if ok:
        body += [_part("Task metric vs trainable parameters", _metric_vs_params, ok),
                 _part("Cost", _cost, ok),
                 _part("Training loss", _loss_overlay, ok)]
        if any(isinstance(r.get("forgetting"), dict) for r in ok):
            body.append(_part("Forgetting", _forgetting_bars, ok))
    out = out_dir / "report.html"
    atomic.write_text(out, _page(title, "\n".join(body)), "the report")
    return out


def _compare_table(rows: list[dict], out_dir: Path) -> str:
    if not rows:
        return _note("No method was run.")
    ok = [r for r in rows if r.get("status") == "ok"]
    measured = _union([[f"{r.get('metric', '?')} on {r.get('split', '?')}" for r in ok]])
    one_metric = len(measured) <= 1  # the usual case: then the metric is named once, above the table
    head = ["method", "status", "lr", "trainable", "storage MB", "peak memory MB", "train s", "tokens / s",
            "latency ms", "merged latency ms"] + ([] if one_metric else ["metric"]) + [
            "tuned", "base", "linear probe", "change vs base", "forgetting change"]
    lines = []
    for r in rows:
        link = _run_link(r.get("run_dir"), out_dir)
        method = (f"<td><a href='{_esc(link)}'>{_esc(r.get('method', '?'))}</a></td>" if link
                  else _td(r.get("method", "?")))
        if r.get("status") != "ok":
            lines.append(method + _td(r.get("status", "?")) +
                         f"<td class='reason' colspan='{len(head) - 2}'>{_esc(r.get('reason') or 'no reason given')}</td>")
            continue
        metric = str(r.get("metric", ""))
        forget = r.get("forgetting") if isinstance(r.get("forgetting"), dict) else {}
        merged = r.get("latency_merged_ms")
        trainable = (f"{_fmt(r.get('trainable_params'))} ({_pct(r.get('trainable_percent'))})"
                     if r.get("trainable_params") is not None else "–")
        cells = [method, _td(r["status"] + (f" ({r['reason']})" if r.get("reason") else "")),
                 _num(r.get("lr"), ".3g"), _td(trainable, cls="num"), _num(r.get("storage_mb"), ".2f"),
                 _td(f"{_fixed(r.get('peak_memory_mb'), ',.1f')} {r.get('memory_kind') or ''}".strip(), cls="num"),
                 _num(r.get("train_seconds"), ".2f"), _num(r.get("tokens_per_second"), ",.0f"),
                 _num(r.get("latency_ms"), ".2f"),
                 _num(merged, ".2f") if merged is not None else _td("cannot merge", cls="note")]
        cells += [] if one_metric else [_td(f"{metric} ({r.get('split', '?')})")]
        cells += [_num(r.get("tuned")), _num(r.get("base")), _num(r.get("linear_probe")),
                  _change(r.get("base"), r.get("tuned"), metric),
                  _change(forget.get("before"), forget.get("after"), str(forget.get("metric", ""))) if forget else _td("")]
        lines.append("".join(cells))
    caption = f"task metric: {measured[0]}" if one_metric and measured else None
    return "<div class='wide'>" + _raw_table(head, lines, caption) + "</div>"


def _run_link(run_dir, out_dir: Path) -> str | None:
    """The run's report.html, relative when the run lies inside out_dir (the folder can move as a whole);
    written first when the run has none yet, so the link is never dead."""
    if not run_dir:
        return None
    target = Path(run_dir) / "report.html"
    if not target.is_file():
        try:
            write_run(run_dir)
        except Exception:  # noqa: BLE001 - a run that cannot be reported still gets its row, unlinked
            return None
    try:
        return quote(target.resolve().relative_to(out_dir.resolve()).as_posix())
    except ValueError:
        return target.resolve().as_uri()


def _metric_vs_params(ok: list[dict]) -> str:
    pts = [r for r in ok if _scalar(r.get("tuned")) and _scalar(r.get("trainable_percent")) and r["trainable_percent"] > 0]
    if not pts:
        return _note("No method has both a task metric and a trainable share to plot.")
    metric, split = ok[0].get("metric", "metric"), ok[0].get("split", "")
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.scatter([r["trainable_percent"] for r in pts], [r["tuned"] for r in pts], color="#1f6fb2", zorder=3)
    for r in pts:
        ax.annotate(_mpl(str(r.get("method"))), (r["trainable_percent"], r["tuned"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=9)
    # Every method starts from one base model on one split, so the baselines are one line each.
    for key, label, style in (("base", "base model", "--"), ("linear_probe", "linear probe", ":")):
        value = next((r[key] for r in ok if _scalar(r.get(key))), None)
        if value is not None:
            ax.axhline(value, color="#666", ls=style, lw=1.2, label=f"{label} ({_fmt(value)})")
    ax.set_xscale("log")
    # Plain numbers (0.5, 2, 10), labelled on minor ticks too: methods often lie within one decade.
    for axis_formatter in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
        axis_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.margins(x=0.15, y=0.1)  # room for the method names beside the outermost points
    ax.set(xlabel="trainable parameters, % of the model (log)", ylabel=_mpl(f"{metric} ({split})"),
           title=_mpl(f"{metric} vs trainable share"))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _img(fig, f"{metric} vs trainable percent")


def _cost(ok: list[dict]) -> str:
    names = [_mpl(str(r.get("method"))) for r in ok]
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    mem_ax, time_ax, lat_ax = fig.subplots(1, 3)
    kinds = sorted({str(r.get("memory_kind")) for r in ok if r.get("memory_kind")})
    _bars(mem_ax, names, [r.get("peak_memory_mb") for r in ok], "#5b8fc9", "%.0f")
    mem_ax.set(title="peak memory", ylabel=f"MB ({', '.join(kinds) or '?'})")
    _bars(time_ax, names, [r.get("train_seconds") for r in ok], "#6aa56a", "%.3g")
    time_ax.set(title="training time", ylabel="seconds")
    # Unmerged and merged side by side; a method that cannot merge has no second bar, and says so.
    x = range(len(ok))
    unmerged = [v if _scalar(v) else 0 for v in (r.get("latency_ms") for r in ok)]
    merged = [r.get("latency_merged_ms") for r in ok]
    bars = lat_ax.bar([i - 0.2 for i in x], unmerged, width=0.4, color="#d9822b", label="as trained")
    lat_ax.bar_label(bars, fmt="%.3g", fontsize=7)
    bars = lat_ax.bar([i + 0.2 for i in x], [v if _scalar(v) else 0 for v in merged], width=0.4, color="#8e6bbf",
                      label="merged")
    lat_ax.bar_label(bars, labels=[f"{v:.3g}" if _scalar(v) else "" for v in merged], fontsize=7)
    for i, v in enumerate(merged):
        if not _scalar(v):
            lat_ax.text(i + 0.2, 0, "n/a", ha="center", va="bottom", fontsize=8, color="#666")
    lat_ax.set_xticks(list(x), names, rotation=30, ha="right")
    lat_ax.set(title="inference latency", ylabel="ms per example")
    lat_ax.legend(fontsize=8)
    for ax in (mem_ax, time_ax, lat_ax):
        ax.grid(alpha=0.3, axis="y")
    return _img(fig, "peak memory, training time and latency per method")


def _step_axis(ax) -> None:
    """Whole steps on x; plain values on y (an offset like '1e-6+6.931e-1' hides a flat curve's level)."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.get_yscale() == "linear":
        ax.ticklabel_format(axis="y", useOffset=False)
    ax.grid(alpha=0.3)


def _bars(ax, names: list[str], values: list, color: str, label_fmt: str = "%.3g") -> None:
    bars = ax.bar(range(len(names)), [v if _scalar(v) else 0 for v in values], color=color)
    ax.bar_label(bars, labels=[label_fmt % v if _scalar(v) else "n/a" for v in values], fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")


def _loss_overlay(ok: list[dict]) -> str:
    fig = Figure(figsize=(8, 3.6), layout="constrained")
    ax = fig.subplots()
    missing = []
    for r in ok:
        records, _ = _read_records(Path(r["run_dir"]) / "metrics.jsonl") if r.get("run_dir") else (None, 0)
        pts = [(x["step"], x["loss"]) for x in records or [] if x.get("type") == "train"
               and _scalar(x.get("step")) and _scalar(x.get("loss"))]
        if pts:
            ax.plot(*zip(*pts), lw=1.3, label=_mpl(str(r.get("method"))))
        else:
            missing.append(str(r.get("method")))
    note = _note(f"No training loss found for: {', '.join(missing)}.") if missing else ""
    if len(missing) == len(ok):
        return note
    ax.set(xlabel="step", ylabel="training loss", title="training loss, all methods")
    ax.legend(fontsize=8)
    _step_axis(ax)
    return _img(fig, "training loss of every method") + note


def _forgetting_bars(ok: list[dict]) -> str:
    rows = [r for r in ok if isinstance(r.get("forgetting"), dict) and _scalar(r["forgetting"].get("change"))]
    if not rows:
        return _note("No method has a forgetting measurement.")
    f0 = rows[0]["forgetting"]
    fig = Figure(figsize=(8, 3.4), layout="constrained")
    ax = fig.subplots()
    _bars(ax, [_mpl(str(r.get("method"))) for r in rows], [r["forgetting"]["change"] for r in rows], "#b35a5a")
    ax.axhline(0, color="#333", lw=0.8)
    ax.set(ylabel=_mpl(f"change in {f0.get('metric', '?')}"),
           title=_mpl(f"forgetting: {f0.get('kind', '?')} on {Path(str(f0.get('file', '?'))).name}"))
    ax.grid(alpha=0.3, axis="y")
    better = "lower" if _lower_is_better(str(f0.get("metric", ""))) else "higher"
    return f"<p>After minus before; {better} is better.</p>" + _img(fig, "forgetting change per method")


# -- reading ----------------------------------------------------------------------------

def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8", errors="replace"))


def _read_records(path: Path) -> tuple[list[dict] | None, int]:
    """(records, unreadable lines); None when there is no file. A run killed mid-write leaves a cut last line."""
    if not path.is_file():
        return None, 0
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    return records, bad


# -- HTML -------------------------------------------------------------------------------

def _page(title: str, body: str) -> str:
    return (f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{_esc(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")


def _part(title: str, build, *args) -> str:
    """A section; a builder that fails leaves a note, not a missing report (None: the section does not apply)."""
    try:
        content = build(*args)
    except Exception as e:  # noqa: BLE001 - the rest of the page is still worth having
        content = _note(f"This section could not be drawn: {type(e).__name__}: {e}")
    if content is None:
        return ""
    return f"<section><h2>{_esc(title)}</h2>\n{content}\n</section>"


def _img(fig: Figure, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"<img alt='{_esc(alt)}' src='data:image/png;base64,{data}'>"


def _table(head: list, rows: list[list], caption: str | None = None) -> str:
    body = ["".join(_num(v) if _scalar(v) else _td(_text(v)) for v in row) for row in rows]
    return _raw_table(head, body, caption)


def _raw_table(head: list, rows: list[str], caption: str | None = None) -> str:
    cap = f"<caption>{_esc(caption)}</caption>" if caption else ""
    th = "".join(f"<th>{_esc(h)}</th>" for h in head)
    return f"<table>{cap}<thead><tr>{th}</tr></thead><tbody>" + "".join(f"<tr>{r}</tr>" for r in rows) + "</tbody></table>"


def _kv_table(pairs: list[tuple]) -> str:
    return "<table><tbody>" + "".join(f"<tr><th>{_esc(k)}</th>{_td(_text(v))}</tr>" for k, v in pairs) + "</tbody></table>"


def _td(value, cls: str | None = None, th: bool = False) -> str:
    tag = "th" if th else "td"
    attr = f" class='{cls}'" if cls else ""
    return f"<{tag}{attr}>{_esc(value)}</{tag}>"


def _num(value, spec: str | None = None) -> str:
    return _td(_fixed(value, spec) if spec else _fmt(value), cls="num")


def _fixed(value, spec: str) -> str:
    return format(value, spec) if _scalar(value) else "–"


def _cell(value) -> str:
    return _td(_clip(_text(value), CLIP), cls="text")


def _change(before, after, metric: str) -> str:
    if not (_scalar(before) and _scalar(after)) or not (math.isfinite(before) and math.isfinite(after)):
        return _td("–", cls="num")
    diff = after - before
    if abs(diff) < 5e-5:  # below the 4 decimals shown: no change, not a win
        return _td("0", cls="num")
    good = diff < 0 if _lower_is_better(metric) else diff > 0
    return _td(f"{diff:+.4f}" if abs(diff) < 1000 else f"{diff:+,.1f}", cls=f"num {'better' if good else 'worse'}")


def _note(text: str) -> str:
    return f"<p class='note'>{_esc(text)}</p>"


def _pre(text: str) -> str:
    return f"<pre>{_esc(text)}</pre>"


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


# -- values -----------------------------------------------------------------------------

def _fmt(v) -> str:
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


def _pct(v) -> str:
    return "–" if not _scalar(v) else f"{v:.2f}%" if v >= 0.01 else f"{v:.2e}%"


def _unit(v, unit: str) -> str | None:
    if not _scalar(v):
        return None
    return (f"{v:,.1f}" if abs(v) >= 10 else f"{v:.2f}") + (f" {unit}" if unit else "")


def _text(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, ensure_ascii=False)
    return _fmt(v)


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _mpl(s: str) -> str:
    """Text for matplotlib: a '$' pair would start mathtext, and a bad formula there raises while drawing."""
    return str(s).replace("$", r"\$")


def _scalar(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _counter(metric: str) -> bool:
    return metric.rsplit("/", 1)[-1] in COUNTERS


def _lower_is_better(metric: str) -> bool:
    name = metric.rsplit("/", 1)[-1]
    return name in LOWER_IS_BETTER or name.endswith("loss")


def _flatten(d: dict, prefix: str = "") -> dict:
    """Nested counts as dotted keys; a big dict (hundreds of labels) stays one cell rather than hundreds of rows."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and 0 < len(v) <= 12:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = _clip(_text(v), CLIP) if isinstance(v, (dict, list)) else v
    return out


def _union(iterables) -> list:
    """Keys in first-seen order."""
    seen: dict = {}
    for it in iterables:
        for k in it:
            seen.setdefault(k, None)
    return list(seen)


def _dict(v) -> dict:
    return v if isinstance(v, dict) else {}


def _list(v) -> list:
    return v if isinstance(v, list) else []
