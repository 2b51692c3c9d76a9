"""The report's plots: matplotlib figures drawn with Agg and embedded in the page as base64 PNG (`img`), so a page
opens offline, from an archive or an attachment.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

# The object-oriented API, not pyplot: no global backend switch (a notebook importing tunelab keeps its own)
# and no figure registry to leak from.
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, MaxNLocator

from . import markup as h


def img(fig: Figure, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"<img alt='{h.esc(alt)}' src='data:image/png;base64,{data}'>"


def step_axis(ax) -> None:
    """Whole steps on x; plain values on y (an offset like '1e-6+6.931e-1' hides a flat curve's level)."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.get_yscale() == "linear":
        ax.ticklabel_format(axis="y", useOffset=False)
    ax.grid(alpha=0.3)


def labelled_bars(ax, names: list[str], values: list, color: str, label_fmt: str = "%.3g") -> None:
    bars = ax.bar(range(len(names)), [v if h.scalar(v) else 0 for v in values], color=color)
    ax.bar_label(bars, labels=[label_fmt % v if h.scalar(v) else "n/a" for v in values], fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")


# -- one run ------------------------------------------------------------------------------

def confusion_figure(cm: dict) -> Figure:
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
    names = [h.mpl(h.clip(x, 24)) for x in labels]
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


def loss_figure(train: list[dict], events: list[dict]) -> Figure:
    fig = Figure(figsize=(8, 3.2), layout="constrained")
    ax = fig.subplots()
    pts = [(r["step"], r["loss"]) for r in train if h.scalar(r.get("loss"))]
    ax.plot(*zip(*pts), color="#1f6fb2", lw=1.4, marker="." if len(pts) < 60 else None)
    for e in events:  # a schedule change explains a bend in the curve
        ax.axvline(e["step"], color="#999", ls=":", lw=1)
        what = e.get("unfrozen") if e.get("type") == "unfreeze" else f"lr x{h.fmt(e.get('lr_scale'))}"
        ax.annotate(h.mpl(h.clip(str(what), 20)), (e["step"], 1), xycoords=("data", "axes fraction"), fontsize=7,
                    rotation=90, va="top", ha="right", color="#666")
    ax.set(xlabel="step", ylabel="loss", title="training loss")
    step_axis(ax)
    return fig


def validation_figure(val: list[dict], test: list[dict], metrics: list[str]) -> Figure:
    """Small multiples, one per metric: each has its own scale (loss and accuracy do not share an axis)."""
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(3.7 * cols, 2.7 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, m in zip(axes, metrics):
        pts = [(r["step"], r[m]) for r in val if h.scalar(r.get(m))]
        ax.plot(*zip(*pts), marker="o", ms=3, lw=1.3, color="#1f6fb2", label="validation")
        tpts = [(r["step"], r[m]) for r in test if h.scalar(r.get(m)) and h.scalar(r.get("step"))]
        if tpts:
            ax.plot(*zip(*tpts), ls="none", marker="*", ms=9, color="#d9822b", label="test")
            ax.legend(fontsize=7)
        ax.set_title(h.mpl(m), fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        step_axis(ax)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    return fig


def lr_figure(train: list[dict]) -> Figure:
    series: dict[str, list] = {}
    for r in train:
        lrs = r.get("lrs") if isinstance(r.get("lrs"), dict) else {"lr": r.get("lr")}
        for name, v in lrs.items():
            if h.scalar(v):
                series.setdefault(str(name), []).append((r["step"], v))
    # Groups that follow one schedule would draw one line over another: one line, all their names.
    merged: dict[tuple, list[str]] = {}
    for name, pts in series.items():
        merged.setdefault(tuple(pts), []).append(name)
    fig = Figure(figsize=(8, 2.8), layout="constrained")
    ax = fig.subplots()
    for pts, names in merged.items():
        ax.plot(*zip(*pts), lw=1.4, marker="." if len(pts) < 60 else None, label=h.mpl(h.clip(", ".join(names), 60)))
    positive = [v for pts in merged for _, v in pts if v > 0]
    if positive and max(positive) / min(positive) > 100:  # layer-wise rates spread over decades
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax.legend(fontsize=8)
    step_axis(ax)
    return fig


# -- a comparison of methods -----------------------------------------------------------

def metric_vs_params_figure(pts: list[dict], ok: list[dict]) -> Figure:
    """The methods in `pts` at (trainable %, task metric); the baselines of `ok` as lines."""
    metric, split = ok[0].get("metric", "metric"), ok[0].get("split", "")
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.scatter([r["trainable_percent"] for r in pts], [r["tuned"] for r in pts], color="#1f6fb2", zorder=3)
    for r in pts:
        ax.annotate(h.mpl(str(r.get("method"))), (r["trainable_percent"], r["tuned"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=9)
    # Every method starts from one base model on one split, so the baselines are one line each.
    for key, label, style in (("base", "base model", "--"), ("linear_probe", "linear probe", ":")):
        value = next((r[key] for r in ok if h.scalar(r.get(key))), None)
        if value is not None:
            ax.axhline(value, color="#666", ls=style, lw=1.2, label=f"{label} ({h.fmt(value)})")
    ax.set_xscale("log")
    # Plain numbers (0.5, 2, 10), labelled on minor ticks too: methods often lie within one decade.
    for axis_formatter in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
        axis_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.margins(x=0.15, y=0.1)  # room for the method names beside the outermost points
    ax.set(xlabel="trainable parameters, % of the model (log)", ylabel=h.mpl(f"{metric} ({split})"),
           title=h.mpl(f"{metric} vs trainable share"))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return fig


def cost_figure(ok: list[dict]) -> Figure:
    names = [h.mpl(str(r.get("method"))) for r in ok]
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    mem_ax, time_ax, lat_ax = fig.subplots(1, 3)
    kinds = sorted({str(r.get("memory_kind")) for r in ok if r.get("memory_kind")})
    labelled_bars(mem_ax, names, [r.get("peak_memory_mb") for r in ok], "#5b8fc9", "%.0f")
    mem_ax.set(title="peak memory", ylabel=f"MB ({', '.join(kinds) or '?'})")
    labelled_bars(time_ax, names, [r.get("train_seconds") for r in ok], "#6aa56a", "%.3g")
    time_ax.set(title="training time", ylabel="seconds")
    # Unmerged and merged side by side; a method that cannot merge has no second bar, and says so.
    x = range(len(ok))
    unmerged = [v if h.scalar(v) else 0 for v in (r.get("latency_ms") for r in ok)]
    merged = [r.get("latency_merged_ms") for r in ok]
    bars = lat_ax.bar([i - 0.2 for i in x], unmerged, width=0.4, color="#d9822b", label="as trained")
    lat_ax.bar_label(bars, fmt="%.3g", fontsize=7)
    bars = lat_ax.bar([i + 0.2 for i in x], [v if h.scalar(v) else 0 for v in merged], width=0.4, color="#8e6bbf",
                      label="merged")
    lat_ax.bar_label(bars, labels=[f"{v:.3g}" if h.scalar(v) else "" for v in merged], fontsize=7)
    for i, v in enumerate(merged):
        if not h.scalar(v):
            lat_ax.text(i + 0.2, 0, "n/a", ha="center", va="bottom", fontsize=8, color="#666")
    lat_ax.set_xticks(list(x), names, rotation=30, ha="right")
    lat_ax.set(title="inference latency", ylabel="ms per example")
    lat_ax.legend(fontsize=8)
    for ax in (mem_ax, time_ax, lat_ax):
        ax.grid(alpha=0.3, axis="y")
    return fig


def loss_overlay_figure(curves: list[tuple[str, list]]) -> Figure:
    """One training-loss line per (method, [(step, loss)])."""
    fig = Figure(figsize=(8, 3.6), layout="constrained")
    ax = fig.subplots()
    for method, pts in curves:
        ax.plot(*zip(*pts), lw=1.3, label=h.mpl(method))
    ax.set(xlabel="step", ylabel="training loss", title="training loss, all methods")
    ax.legend(fontsize=8)
    step_axis(ax)
    return fig


def forgetting_figure(rows: list[dict]) -> Figure:
    """Each method's forgetting change (after - before) as a bar."""
    f0 = rows[0]["forgetting"]
    fig = Figure(figsize=(8, 3.4), layout="constrained")
    ax = fig.subplots()
    labelled_bars(ax, [h.mpl(str(r.get("method"))) for r in rows], [r["forgetting"]["change"] for r in rows], "#b35a5a")
    ax.axhline(0, color="#333", lw=0.8)
    ax.set(ylabel=h.mpl(f"change in {f0.get('metric', '?')}"),
           title=h.mpl(f"forgetting: {f0.get('kind', '?')} on {Path(str(f0.get('file', '?'))).name}"))
    ax.grid(alpha=0.3, axis="y")
    return fig
