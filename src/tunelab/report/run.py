"""The page of one finished run: base vs tuned, forgetting, curves, confusion matrix, samples, data report, config.

Built only from the run directory's files; an optional file that is missing or unreadable becomes a note in
its section.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import atomic
from ..errors import TunelabError
from . import markup as h
from . import plots

# Sample fields a model writes: shown before and after even where training did not change them.
OUTPUT_FIELDS = ("label", "score", "predicted", "prediction", "generated", "generation", "output", "answer")


def write_run(run_dir) -> Path:
    """Write run_dir/report.html from the run's files; returns its path."""
    run_dir = Path(run_dir)
    summary = _read_summary(run_dir)
    multi = isinstance(summary.get("tasks"), dict)
    title = f"{summary.get('method', '?')} on {summary.get('task', '?')}"
    records, bad_lines = read_records(run_dir / "metrics.jsonl")
    body = [
        f"<h1>{h.esc(title)}</h1>",
        f"<p class='sub'>model {h.esc(summary.get('model', '?'))} &middot; run {h.esc(run_dir.resolve())}</p>",
        h.part("Run", _facts, summary),
        h.part("Base vs tuned", _multitask_scores if multi else _scores, summary),
        h.part("Forgetting", _forgetting, summary) if "forgetting" in summary else "",
        h.part("Generation", _generation, summary, run_dir / "generations.json") if "generation" in summary else "",
        h.part("Confusion matrix", _confusion, summary, multi),
        h.part("Training curves", _curves, records, bad_lines),
        h.part("Samples", _samples, run_dir / "samples.json"),
        h.part("Data", _data, run_dir / "data_report.json"),
        h.part("Config", _config, run_dir / "config.yaml"),
    ]
    out = run_dir / "report.html"
    atomic.write_text(out, h.page(title, "\n".join(body)), "the report")
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
         f"{h.fmt(trainable)} of {h.fmt(s('total_params'))} ({h.pct(s('trainable_percent'))})"),
        ("train time", h.unit(s("train_seconds"), "s")), ("tokens / s", h.unit(s("tokens_per_second"), "")),
        ("train tokens", h.fmt(s("train_tokens")) if s("train_tokens") is not None else None),
        ("peak memory", h.unit(s("peak_memory_mb"), "MB")),
        ("steps", s("steps")), ("best step", s("best_step")), ("stopped early", s("stopped_early")),
        ("best metric", ", ".join(f"{k} {h.fmt(v)}" for k, v in s("metric").items())
         if isinstance(s("metric"), dict) else s("metric")),
        ("saved", f"{s('artifact')}/ ({h.fmt(s('artifact_mb'))} MB)" if s("artifact") else None),
        ("task sampling", s("sampling")),
        ("task weights", ", ".join(f"{n} {h.fmt(w)}" for n, w in s("weights").items())
         if isinstance(s("weights"), dict) else None),
        ("wall time", h.unit(s("wall_seconds"), "s")), ("device", s("device")), ("torch", s("torch")),
    ]
    table = h.kv_table([(k, v) for k, v in rows if v is not None])
    groups = s("optimizer_groups")
    if isinstance(groups, list) and groups and all(isinstance(g, dict) for g in groups):
        keys = h.union(g.keys() for g in groups)
        table += h.table(keys, [[g.get(k) for k in keys] for g in groups], caption="optimizer parameter groups")
    return table


def _scores(summary: dict) -> str:
    tuned = {"validation": summary.get("eval"), "test": summary.get("test")}
    return _score_table(h.as_dict(summary.get("base")), h.as_dict(summary.get("linear_probe")), tuned)


def _multitask_scores(summary: dict) -> str:
    base, evals, tests = h.as_dict(summary.get("base")), h.as_dict(summary.get("eval")), h.as_dict(summary.get("test"))
    parts = []
    for name, kind in summary["tasks"].items():
        parts.append(f"<h3>{h.esc(name)} <span class='note'>({h.esc(kind)})</span></h3>")
        tuned = {"validation": evals.get(name), "test": tests.get(name)}
        parts.append(_score_table(h.as_dict(base.get(name)), {}, tuned))
    return "".join(parts)


def _score_table(base: dict, probe: dict, tuned: dict) -> str:
    """Per split and scalar metric: base, linear probe (when there is one), tuned, and tuned − base."""
    splits = h.union([["validation", "test"], base, probe])
    head = ["split", "metric", "base"] + (["linear probe"] if probe else []) + ["tuned", "change"]
    rows = []
    for split in splits:
        t, b, p = h.as_dict(tuned.get(split)), h.as_dict(base.get(split)), h.as_dict(probe.get(split))
        metrics = [m for m in h.union([t, b, p]) if not h.counter(m) and any(h.scalar(d.get(m)) for d in (t, b, p))]
        n = t.get("examples", b.get("examples"))
        label = f"{split} (n={h.fmt(n)})" if h.scalar(n) else split
        for i, m in enumerate(metrics):
            cells = [h.td(label if i == 0 else "", th=True), h.td(m), h.num(b.get(m))]
            cells += [h.num(p.get(m))] if probe else []
            cells += [h.num(t.get(m)), h.change(b.get(m), t.get(m), m)]
            rows.append("".join(cells))
    if not rows:
        return h.note("summary.json holds no scalar metric to compare.")
    return h.raw_table(head, rows)


def _forgetting(summary: dict) -> str:
    f = summary["forgetting"]
    if not isinstance(f, dict):
        return h.note("summary.json's forgetting entry is not an object.")
    better = "lower" if h.lower_is_better(str(f.get("metric", ""))) else "higher"
    what = (f"{f.get('metric', '?')} on {f.get('file', '?')} ({f.get('kind', '?')}), measured before and after "
            f"training; change = after − before, {better} is better")
    head = ["kind", "metric", "file", "before", "after", "change"]
    row = [h.td(f.get("kind")), h.td(f.get("metric")), h.td(f.get("file")), h.num(f.get("before")),
           h.num(f.get("after")), h.change(f.get("before"), f.get("after"), str(f.get("metric", "")))]
    return f"<p>{h.esc(what)}.</p>" + h.raw_table(head, ["".join(row)])


GENERATION_ROWS = 5  # prompts shown with their base and tuned replies


def _generation(summary: dict, path: Path) -> str:
    """eval.generate: the reply scores base vs tuned, then the first prompts with both replies."""
    gen = h.as_dict(summary["generation"])
    intro = ("<p>Replies generated for the first held-out prompts by the model before and after training, scored "
             "against the reference replies: exact match and token F1 after SQuAD normalisation, ROUGE-L F, corpus "
             "BLEU (0-100), mean length in tokens, share of replies that ended with EOS rather than at "
             "eval.max_new_tokens.</p>")
    scores = _score_table(h.as_dict(gen.get("base")), {}, h.as_dict(gen.get("tuned")))
    verdicts = h.as_dict(gen.get("judge"))
    if verdicts:  # eval.judge: a reward model's or the user's function's scores of the same replies
        table = []
        for split, v in verdicts.items():
            v = h.as_dict(v)
            wins = v.get("win_rate")
            table.append([split, v.get("base_mean"), v.get("tuned_mean"), h.pct(100 * wins) if h.scalar(wins) else None])
        scores += h.table(["split", "judge: base mean", "tuned mean", "tuned wins"], table,
                          caption="judge (eval.judge: a reward-model run or a Python function): the judge's score of "
                                  "each reply; ties count half a win")
    if not path.is_file():
        return intro + scores + h.note("No generations.json in this run: the replies themselves are not shown.")
    data = h.as_dict(_read_json(path))
    split = "validation" if data.get("validation") else next(iter(data), None)
    rows = [h.as_dict(r) for r in h.as_list(data.get(split))][:GENERATION_ROWS]
    head = ["prompt", "reference", "base reply", "tuned reply"]
    body = ["".join(h.cell(r.get(k)) for k in ("prompt", "reference", "base_reply", "tuned_reply")) for r in rows]
    return (intro + scores + f"<p>The first {len(rows)} {h.esc(split)} prompt(s); fields are cut at {h.CLIP} "
            f"characters (generations.json holds them whole).</p>" + h.raw_table(head, body))


def _confusion(summary: dict, multi: bool) -> str | None:
    """The test split's matrix, else validation's; per task for a multi-task run. None: no matrix to draw."""
    if multi:
        tests, evals = h.as_dict(summary.get("test")), h.as_dict(summary.get("eval"))
        found = [(name, *_pick_matrix(h.as_dict(tests.get(name)), h.as_dict(evals.get(name))))
                 for name in summary["tasks"]]
    else:
        found = [(None, *_pick_matrix(h.as_dict(summary.get("test")), h.as_dict(summary.get("eval"))))]
    found = [f for f in found if f[1] is not None]
    if not found:
        return None
    parts = []
    for name, matrix, split in found:
        heading = f"{name}: {split} split" if name else f"{split} split"
        figure = plots.img(plots.confusion_figure(matrix), f"confusion matrix, {heading}")
        parts.append(f"<h3>{h.esc(heading)}</h3>" + figure)
    return "".join(parts)


def _pick_matrix(test: dict, val: dict):
    for split, metrics in (("test", test), ("validation", val)):
        cm = metrics.get("confusion_matrix")
        if isinstance(cm, dict) and cm.get("labels") and cm.get("rows_true_cols_pred"):
            return cm, split
    return None, None


def _curves(records: list[dict] | None, bad_lines: int) -> str:
    if records is None:
        return h.note("No metrics.jsonl in this run: no training curves.")
    parts = [h.note(f"{bad_lines} line(s) of metrics.jsonl could not be read and were skipped.")] if bad_lines else []
    train = [r for r in records if r.get("type") == "train" and h.scalar(r.get("step"))]
    val = [r for r in records if r.get("type") == "eval" and r.get("split") == "validation" and h.scalar(r.get("step"))]
    # A multi-task run logs one test record per task, with plain metric names; its curves are named task/metric.
    test = [{(f"{r['task']}/{k}" if "task" in r and k != "step" else k): v for k, v in r.items()}
            for r in records if r.get("type") == "eval" and r.get("split") == "test"]
    events = [r for r in records if r.get("type") in ("unfreeze", "plateau") and h.scalar(r.get("step"))]
    if any(h.scalar(r.get("loss")) for r in train):
        parts.append(plots.img(plots.loss_figure(train, events), "training loss vs step"))
    else:
        parts.append(h.note("metrics.jsonl holds no training loss."))
    metrics = [m for m in h.union(val) if m not in ("step", "epoch") and not h.counter(m)
               and any(h.scalar(r.get(m)) for r in val)]
    if metrics:
        parts.append(plots.img(plots.validation_figure(val, test, metrics), "validation metrics vs step"))
    else:
        parts.append(h.note("metrics.jsonl holds no validation evaluation."))
    if any(isinstance(r.get("lrs"), dict) or h.scalar(r.get("lr")) for r in train):
        parts.append(plots.img(plots.lr_figure(train), "learning rate vs step"))
    return "".join(parts)


def _samples(path: Path) -> str:
    if not path.is_file():
        return h.note("No samples.json in this run (multi-task runs, and runs with eval.samples=0, write none).")
    data = _read_json(path)
    if not isinstance(data, dict):
        return h.note("samples.json is not an object with 'before' and 'after' lists.")
    before, after = h.as_list(data.get("before")), h.as_list(data.get("after"))
    if not before and not after:
        return h.note("samples.json holds no example.")
    pairs = [(h.as_dict(before[i]) if i < len(before) else {}, h.as_dict(after[i]) if i < len(after) else {})
             for i in range(max(len(before), len(after)))]
    # Dicts (e.g. every class's probability) do not read well in a cell; everything else is shown.
    fields = [f for f in h.union(d for pair in pairs for d in pair)
              if not any(isinstance(d.get(f), dict) for pair in pairs for d in pair)]
    shared = [f for f in fields if f not in OUTPUT_FIELDS and all(b.get(f) == a.get(f) for b, a in pairs)]
    changed = [f for f in fields if f not in shared]
    head = shared + [f"{f} {when}" for f in changed for when in ("before", "after")]
    rows = []
    for b, a in pairs:
        cells = [h.cell(b.get(f, a.get(f))) for f in shared]
        cells += [h.cell(d.get(f)) for f in changed for d in (b, a)]
        rows.append("".join(cells))
    return (f"<p>The first {len(pairs)} validation example(s), scored by the model before and after training; "
            f"fields are cut at {h.CLIP} characters.</p>" + h.raw_table(head, rows))


def _data(path: Path) -> str:
    if not path.is_file():
        return h.note("No data_report.json in this run.")
    report = _read_json(path)
    if isinstance(report, dict) and isinstance(report.get("splits"), dict):
        return _data_one(report)
    if isinstance(report, dict) and report and all(isinstance(v, dict) and isinstance(v.get("splits"), dict)
                                                   for v in report.values()):
        return "".join(f"<h3>{h.esc(name)}</h3>" + _data_one(r) for name, r in report.items())
    return h.pre(json.dumps(report, indent=2, ensure_ascii=False))


def _data_one(report: dict) -> str:
    """One table of the splits side by side, a row per count; the rest (files, split settings) as key / value."""
    splits = {name: h.flatten(s) if isinstance(s, dict) else {"": s} for name, s in report["splits"].items()}
    keys = h.union(splits.values())
    table = h.table(["", *splits], [[k, *(s.get(k) for s in splits.values())] for k in keys], caption="per split")
    rest = h.flatten({k: v for k, v in report.items() if k != "splits"})
    return (h.kv_table(list(rest.items())) if rest else "") + table


def _config(path: Path) -> str:
    if not path.is_file():
        return h.note("No config.yaml in this run.")
    text = path.read_text(encoding="utf-8", errors="replace")
    return "<p>The resolved config, as the run saved it.</p>" + h.pre(text)


# -- reading ----------------------------------------------------------------------------

def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8", errors="replace"))


def read_records(path: Path) -> tuple[list[dict] | None, int]:
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
