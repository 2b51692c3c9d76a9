"""The page of `tunelab compare`: a row per method (what it cost and gained), then plots across methods."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from .. import atomic
from . import markup as h
from . import plots
from .run import read_records, write_run


def write_compare(out_dir, rows: list[dict], title: str | None = None) -> Path:
    """Write out_dir/report.html for `tunelab compare`; returns its path.

    A row per method: {"method", "status": "ok" | "skipped", "reason", "run_dir", "lr", "trainable_params",
    "total_params", "trainable_percent", "storage_mb", "peak_memory_mb", "memory_kind": "rss" | "cuda",
    "train_seconds", "tokens_per_second", "latency_ms", "latency_merged_ms" (None: cannot merge), "metric",
    "split", "tuned", "base", "linear_probe", "forgetting": None | {"kind", "metric", "file", "before", "after",
    "change"}, "generation": None | {"split", "rougeL_base", "rougeL_tuned", ... (compare.generation_row)}}; a skipped row needs only method, status and reason. Each run's own report.html is linked (and
    written, where the run has none yet)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = title or "tunelab compare"
    ok = [r for r in rows if r.get("status") == "ok"]
    body = [f"<h1>{h.esc(title)}</h1>", h.part("Methods", _compare_table, rows, out_dir)]
    if ok:
        body += [h.part("Task metric vs trainable parameters", _metric_vs_params, ok),
                 h.part("Cost", _cost, ok),
                 h.part("Training loss", _loss_overlay, ok)]
        if any(isinstance(r.get("forgetting"), dict) for r in ok):
            body.append(h.part("Forgetting", _forgetting_bars, ok))
    out = out_dir / "report.html"
    atomic.write_text(out, h.page(title, "\n".join(body)), "the report")
    return out


def _compare_table(rows: list[dict], out_dir: Path) -> str:
    if not rows:
        return h.note("No method was run.")
    ok = [r for r in rows if r.get("status") == "ok"]
    measured = h.union([[f"{r.get('metric', '?')} on {r.get('split', '?')}" for r in ok]])
    one_metric = len(measured) <= 1  # the usual case: then the metric is named once, above the table
    head = ["method", "status", "lr", "trainable", "storage MB", "peak memory MB", "train s", "tokens / s",
            "latency ms", "merged latency ms"] + ([] if one_metric else ["metric"]) + [
            "tuned", "base", "linear probe", "change vs base", "forgetting change"]
    generated = any(r.get("generation") for r in ok)  # eval.generate: reply scores base and tuned
    if generated:
        head += ["rougeL base", "rougeL tuned", "token F1 base", "token F1 tuned", "ended with EOS base",
                 "ended with EOS tuned"]
    lines = []
    for r in rows:
        link = run_link(r.get("run_dir"), out_dir)
        method = (f"<td><a href='{h.esc(link)}'>{h.esc(r.get('method', '?'))}</a></td>" if link
                  else h.td(r.get("method", "?")))
        if r.get("status") != "ok":
            reason = h.esc(r.get("reason") or "no reason given")
            lines.append(method + h.td(r.get("status", "?")) +
                         f"<td class='reason' colspan='{len(head) - 2}'>{reason}</td>")
            continue
        metric = str(r.get("metric", ""))
        forget = r.get("forgetting") if isinstance(r.get("forgetting"), dict) else {}
        merged = r.get("latency_merged_ms")
        trainable = (f"{h.fmt(r.get('trainable_params'))} ({h.pct(r.get('trainable_percent'))})"
                     if r.get("trainable_params") is not None else "–")
        cells = [method, h.td(r["status"] + (f" ({r['reason']})" if r.get("reason") else "")),
                 h.num(r.get("lr"), ".3g"), h.td(trainable, cls="num"), h.num(r.get("storage_mb"), ".2f"),
                 h.td(f"{h.fixed(r.get('peak_memory_mb'), ',.1f')} {r.get('memory_kind') or ''}".strip(), cls="num"),
                 h.num(r.get("train_seconds"), ".2f"), h.num(r.get("tokens_per_second"), ",.0f"),
                 h.num(r.get("latency_ms"), ".2f"),
                 h.num(merged, ".2f") if merged is not None else h.td("cannot merge", cls="note")]
        cells += [] if one_metric else [h.td(f"{metric} ({r.get('split', '?')})")]
        cells += [h.num(r.get("tuned")), h.num(r.get("base")), h.num(r.get("linear_probe")),
                  h.change(r.get("base"), r.get("tuned"), metric),
                  h.change(forget.get("before"), forget.get("after"), str(forget.get("metric", "")))
                  if forget else h.td("")]
        if generated:
            g = r.get("generation") if isinstance(r.get("generation"), dict) else {}
            cells += [h.num(g.get(f"{m}_{side}")) for m in ("rougeL", "token_f1", "ended_with_eos")
                      for side in ("base", "tuned")]
        lines.append("".join(cells))
    caption = f"task metric: {measured[0]}" if one_metric and measured else None
    return "<div class='wide'>" + h.raw_table(head, lines, caption) + "</div>"


def run_link(run_dir, out_dir: Path) -> str | None:
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
    pts = [r for r in ok
           if h.scalar(r.get("tuned")) and h.scalar(r.get("trainable_percent")) and r["trainable_percent"] > 0]
    if not pts:
        return h.note("No method has both a task metric and a trainable share to plot.")
    metric = ok[0].get("metric", "metric")
    return plots.img(plots.metric_vs_params_figure(pts, ok), f"{metric} vs trainable percent")


def _cost(ok: list[dict]) -> str:
    return plots.img(plots.cost_figure(ok), "peak memory, training time and latency per method")


def _loss_overlay(ok: list[dict]) -> str:
    curves, missing = [], []
    for r in ok:
        records, _ = read_records(Path(r["run_dir"]) / "metrics.jsonl") if r.get("run_dir") else (None, 0)
        pts = [(x["step"], x["loss"]) for x in records or [] if x.get("type") == "train"
               and h.scalar(x.get("step")) and h.scalar(x.get("loss"))]
        if pts:
            curves.append((str(r.get("method")), pts))
        else:
            missing.append(str(r.get("method")))
    note = h.note(f"No training loss found for: {', '.join(missing)}.") if missing else ""
    if len(missing) == len(ok):
        return note
    return plots.img(plots.loss_overlay_figure(curves), "training loss of every method") + note


def _forgetting_bars(ok: list[dict]) -> str:
    rows = [r for r in ok if isinstance(r.get("forgetting"), dict) and h.scalar(r["forgetting"].get("change"))]
    if not rows:
        return h.note("No method has a forgetting measurement.")
    better = "lower" if h.lower_is_better(str(rows[0]["forgetting"].get("metric", ""))) else "higher"
    return f"<p>After minus before; {better} is better.</p>" + plots.img(plots.forgetting_figure(rows),
                                                                          "forgetting change per method")
