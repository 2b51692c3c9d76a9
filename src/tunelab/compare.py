"""`tunelab compare RECIPE --methods full,lora,...`: the "which method should I pick?" table, measured.

Every method trains on the recipe's data with the same seed, split and step budget, each in its own process, so
that its peak memory (ru_maxrss) is its own and a crash or a method that cannot apply costs one row, not the
comparison. The recipe's method settings carry over where the other method has the same key (LoRA's r to DoRA and
QLoRA, say); each method gets its own usual learning rate unless `--lr method=value` says otherwise (the recipe's
own method keeps the recipe's train.lr).

Then, in this process, each trained run is loaded and timed on held-out examples one at a time (a forward pass;
per-example latency as a service would see it), as trained and again with the method merged into the weights
where it can be. Output directory: compare.md, compare.csv, compare.json, report.html, runs/<method>/, logs/.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from pydantic import ValidationError

from . import atomic, evaluate, hub, methods, models, predict, report, runs, tasks
from . import config as config_mod
from .config import METHOD_NAMES
from .config.methods import BY_NAME
from .errors import TunelabError

# A usual peak LR per method for fine-tuning small and mid-size models, as each method declares it (they differ by
# orders of magnitude: full and partial fine-tuning move pretrained weights, the others train new modules).
DEFAULT_LR = {name: m.DEFAULT_LR for name, m in methods.METHODS.items()}
LATENCY_EXAMPLES = 32
COLUMNS = ["method", "status", "trainable_params", "trainable_percent", "storage_mb", "peak_memory_mb",
           "train_seconds", "tokens_per_second", "latency_ms", "latency_merged_ms", "metric", "split", "tuned", "base",
           "linear_probe", "forgetting_before", "forgetting_after", "forgetting_change", "lr", "steps", "reason",
           "generation_split", "rougeL_base", "rougeL_tuned", "token_f1_base", "token_f1_tuned", "ended_with_eos_base",
           "ended_with_eos_tuned"]
GENERATION_FIGURES = ("rougeL", "token_f1", "ended_with_eos")  # eval.generate's columns, base and tuned


def parse_methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHOD_NAMES]
    if unknown or not names:
        import difflib

        close = difflib.get_close_matches(unknown[0], METHOD_NAMES, n=1) if unknown else []
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise TunelabError(f"--methods {text!r}: {', '.join(unknown) or 'no method'} is not a tunelab method{hint}; "
                           f"choose from {', '.join(METHOD_NAMES)} (comma-separated).")
    if len(set(names)) != len(names):
        raise TunelabError(f"--methods {text!r} names a method twice; list each once.")
    return names


def parse_lrs(items: list[str] | None) -> dict[str, float]:
    out = {}
    for item in items or []:
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise TunelabError(f"--lr {item!r}: expected METHOD=VALUE, e.g. --lr lora=2e-4.") from None
        if name.strip() not in METHOD_NAMES:
            raise TunelabError(f"--lr {item!r}: '{name}' is not a tunelab method ({', '.join(METHOD_NAMES)}).")
    return out


def parse_settings(items: list[str] | None, method_names: list[str]) -> dict[str, dict]:
    """`--set freeze.freeze_layers=4` -> {"freeze": {"freeze_layers": 4}} (values parsed as YAML scalars)."""
    out: dict[str, dict] = {}
    for item in items or []:
        target, eq, value = item.partition("=")
        name, dot, key = target.partition(".")
        if not (eq and dot and key):
            raise TunelabError(f"--set {item!r}: expected METHOD.KEY=VALUE, e.g. --set freeze.freeze_layers=4.")
        if name not in method_names:
            raise TunelabError(f"--set {item!r}: '{name}' is not among --methods ({', '.join(method_names)}).")
        out.setdefault(name, {}).update(config_mod.parse_overrides([f"{key}={value}"]))
    return out


def method_config(cfg, name: str, lrs: dict[str, float], steps: int | None, run_dir: Path, first: bool,
                  settings: dict | None = None):
    """The recipe with method `name`: shared method keys carried over, then `settings` (from --set), the method's
    LR, the common budget."""
    cls = BY_NAME[name]
    own = cfg.method.model_dump(exclude_unset=True)
    carried = {k: v for k, v in own.items() if k in cls.model_fields and k not in ("name", "init_from")}
    out = cfg.model_copy(deep=True)
    try:
        out.method = cls(name=name, **(carried | (settings or {})))
    except ValidationError as e:
        err = e.errors()[0]
        raise TunelabError(f"--set for {name}: method.{'.'.join(map(str, err['loc']))}: {err['msg']}. "
                           f"See `tunelab config explain` for the keys of method {name}.") from None
    out.train.lr = lrs.get(name, cfg.train.lr if name == cfg.method.name else DEFAULT_LR[name])
    if steps:
        out.train.max_steps = steps
    if cfg.train.unfreeze == "gradual" and not cls.UNFREEZES:
        out.train.unfreeze = "none"
    # The base model's figures are the same for every method: the linear probe is fitted once.
    out.eval.linear_probe = cfg.eval.linear_probe and first
    out.output_dir = str(run_dir)
    return out


def run(recipe, overrides: list[str], method_names: list[str], output: str | None = None, lrs=None,
        steps: int | None = None, overwrite: bool = False, echo=print, settings: dict | None = None) -> list[dict]:
    cfg = config_mod.load(recipe, overrides)
    settings = settings or {}
    if cfg.tasks is not None:
        raise TunelabError("`tunelab compare` compares methods on one task; this recipe is multi-task. Compare on one "
                           "of its tasks' recipes, or train the multi-task recipe once per method.")
    lrs = lrs or {}
    out = runs.expand(output or f"runs/compare-{Path(recipe).stem if recipe else 'run'}")
    claim = runs.claim(out, overwrite, "compare", cfg)
    with claim:  # an earlier comparison there stays as it was until this one has finished
        # A Hub id is pinned to the commit its branch points at now: every method trains the same weights.
        cfg.model = hub.pinned(cfg.model)
        # Every method's config is built (and so checked) before the first one trains.
        configs = {name: method_config(cfg, name, lrs, steps, (out / "runs" / name).resolve(), first=i == 0,
                                       settings=settings.get(name)) for i, name in enumerate(method_names)}
        out = claim.make()
        atomic.write_text(out / "config.yaml", config_mod.to_yaml(cfg), "the comparison's config")
        for sub in ("recipes", "logs", "runs"):
            (out / sub).mkdir()

        rows = []
        for i, (name, mcfg) in enumerate(configs.items()):
            recipe_path = out / "recipes" / f"{name}.yaml"
            atomic.write_text(recipe_path, config_mod.to_yaml(mcfg), "a method's recipe")
            echo(f"== {name} ({i + 1}/{len(method_names)}): lr {mcfg.train.lr:g}, log in {out / 'logs' / (name + '.log')}")
            row = _train_one(name, recipe_path, out / "logs" / f"{name}.log", mcfg)
            if row["status"] == "ok":
                row.update(latency(Path(row["run_dir"]), name, model_cfg=mcfg.model))
                echo(f"   {row['metric']} {row['tuned']:.4f} (base {_fmt(row['base'])}), {row['train_seconds']:.0f} s, "
                     f"peak {row['peak_memory_mb']:.0f} MB, {row['latency_ms']:.1f} ms/example")
            else:
                echo(f"   {row['status']}: {row['reason']}")
            rows.append(row)
            _write_tables(out, rows)  # after every method: a long comparison stopped half-way keeps what it measured

        probe = next((r["linear_probe"] for r in rows if r.get("linear_probe") is not None), None)
        for r in rows:
            if r["status"] == "ok" and r.get("linear_probe") is None:
                r["linear_probe"] = probe
        _write_tables(out, rows)
        rebuild_report(out)
        out = claim.finish()
    echo((out / "compare.md").read_text(encoding="utf-8"))
    echo(f"compare directory: {out.resolve()}")
    return rows


def opted_in(model_cfg) -> dict:
    """The recipe's own opt-ins, for loading the runs this command has just trained from it."""
    if model_cfg is None:
        return {}
    return {"trust_remote_code": model_cfg.trust_remote_code, "allow_pickle": model_cfg.allow_pickle}


def rebuild_report(out: Path) -> Path:
    rows = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    return report.write_compare(out, rows, title=f"tunelab compare: {out.name}")


def _train_one(name: str, recipe_path: Path, log_path: Path, mcfg) -> dict:
    """One method's run in a child process; its summary becomes a row, its error message a skip reason."""
    row = {"method": name, "lr": mcfg.train.lr, "run_dir": mcfg.output_dir}
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(recipe_path)], stdout=log,
                              stderr=subprocess.PIPE, text=True)
        log.write(proc.stderr)
    summary_path = Path(mcfg.output_dir) / "summary.json"
    if proc.returncode != 0 or not summary_path.is_file():
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        if errors:  # tunelab's own message: the method cannot apply to this model or data
            return row | {"status": "skipped", "reason": errors[-1][len("error: "):], "run_dir": None}
        tail = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or [f"exit code {proc.returncode}"]
        return row | {"status": "failed", "reason": f"{tail[0]} (see {log_path})", "run_dir": None}
    return row | summary_row(json.loads(summary_path.read_text(encoding="utf-8")), mcfg)


def summary_row(s: dict, cfg) -> dict:
    """A finished run's figures for the table, from its summary.json `s` and config `cfg`: the metric it is selected
    on, on test where it has one, else validation."""
    task = tasks.get(cfg.task.type)
    metric = task.MAIN_METRIC if cfg.train.metric == "auto" else cfg.train.metric
    split, key = ("test", "test") if "test" in s else ("validation", "eval")
    forgetting = s.get("forgetting")
    return {
        "status": "ok", "reason": None, "trainable_params": s["trainable_params"], "total_params": s["total_params"],
        "trainable_percent": s["trainable_percent"], "storage_mb": s["artifact_mb"],
        "peak_memory_mb": s["peak_memory_mb"], "memory_kind": "cuda" if s["device"].startswith("cuda") else "rss",
        "train_seconds": s["train_seconds"], "tokens_per_second": s["tokens_per_second"], "steps": s["steps"],
        "metric": metric, "split": split, "tuned": s[key].get(metric),
        "base": s.get("base", {}).get(split, {}).get(metric),
        "linear_probe": s.get("linear_probe", {}).get(split, {}).get(metric), "forgetting": forgetting,
        "generation": generation_row(s.get("generation")),
    }


def generation_row(generation: dict | None) -> dict | None:
    """eval.generate's figures of one run for the table: test's where generated, else validation's."""
    tuned = (generation or {}).get("tuned", {})
    split = "test" if tuned.get("test", {}).get("examples") else "validation"
    if not tuned.get(split, {}).get("examples"):
        return None
    base = generation.get("base", {}).get(split, {})
    return {"split": split, **{f"{m}_{side}": figs.get(m) for m in GENERATION_FIGURES
                               for side, figs in (("base", base), ("tuned", tuned[split]))}}


def latency(run_dir: Path, name: str, n: int = LATENCY_EXAMPLES, model_cfg=None) -> dict:
    """Median milliseconds of one held-out example's forward pass, as trained and merged (None: cannot merge).
    `model_cfg`: the recipe's model section, whose trust_remote_code / allow_pickle the user opted into."""
    trained = predict.load(run_dir, **opted_in(model_cfg))
    cfg, task = trained.cfg, trained.task
    splits, _ = task.load_splits(cfg, cfg.train.seed)
    rows = (splits.get("test") or splits["validation"])[:n]
    max_length = models.max_input_length(trained.model, trained.tokenizer, cfg.data.max_length,
                                         methods.reserved_positions(cfg.method))
    feats, _ = task.encode(rows, trained.tokenizer, trained.info, max_length)
    pad = trained.tokenizer.pad_token_id
    unmerged = _time(trained.model, task, feats, pad, trained.device)
    try:
        merged_model = methods.get(name).merge(trained.model)
    except TunelabError:
        return {"latency_ms": unmerged, "latency_merged_ms": None}
    return {"latency_ms": unmerged, "latency_merged_ms": _time(merged_model, task, feats, pad, trained.device)}


def _time(model, task, feats: list[dict], pad_id: int, device) -> float:
    for f in feats[:2]:  # warm-up: first calls allocate and pick kernels
        evaluate.outputs(model, task, [f], 1, pad_id, device)
    times = []
    for f in feats:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        evaluate.outputs(model, task, [f], 1, pad_id, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


# -- tables ------------------------------------------------------------------------

def _fmt(v, digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _flat(r: dict) -> dict:
    f = r.get("forgetting") or {}
    g = r.get("generation") or {}
    return {**{k: r.get(k) for k in COLUMNS}, "forgetting_before": f.get("before"), "forgetting_after": f.get("after"),
            "forgetting_change": f.get("change"), "generation_split": g.get("split"),
            **{f"{m}_{side}": g.get(f"{m}_{side}") for m in GENERATION_FIGURES for side in ("base", "tuned")}}


def _write_tables(out: Path, rows: list[dict]) -> None:
    atomic.write_json(out / "compare.json", rows, "the comparison table")
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(_flat(r) for r in rows)
    atomic.write_text(out / "compare.csv", table.getvalue(), "the comparison table")
    atomic.write_text(out / "compare.md", markdown(rows), "the comparison table")


def markdown(rows: list[dict]) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    metric = ok[0]["metric"] if ok else "metric"
    split = ok[0]["split"] if ok else "test"
    forget = next((r["forgetting"] for r in ok if r.get("forgetting")), None)
    head = ["method", "trainable params", "storage MB", "peak MB", "train s", "tokens/s", "ms/example (merged)",
            f"{split} {metric}", "base"]
    if forget:
        head.append(f"forgetting: {forget['metric']} (base → tuned)")
    generated = any(r.get("generation") for r in ok)
    if generated:
        head += ["rougeL (base → tuned)", "ended with EOS (base → tuned)"]
    head.append("lr")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['status']}: {r['reason']} |" + " |" * (len(head) - 2))
            continue
        merged = "–" if r["latency_merged_ms"] is None else f"{r['latency_merged_ms']:.1f}"
        base = _fmt(r["base"]) + (f" (probe {_fmt(r['linear_probe'])})" if r.get("linear_probe") is not None else "")
        cells = [r["method"], f"{r['trainable_params']:,} ({r['trainable_percent']:.2f} %)", f"{r['storage_mb']:.1f}",
                 f"{r['peak_memory_mb']:,.0f}", f"{r['train_seconds']:.0f}", f"{r['tokens_per_second']:,.0f}",
                 f"{r['latency_ms']:.1f} ({merged})", _fmt(r["tuned"]), base]
        if forget:
            f = r.get("forgetting")
            cells.append(f"{f['before']:.4f} → {f['after']:.4f} ({f['change']:+.4f})" if f else "–")
        if generated:
            g = r.get("generation") or {}
            cells += [f"{_fmt(g.get('rougeL_base'))} → {_fmt(g.get('rougeL_tuned'))}",
                      f"{_fmt(g.get('ended_with_eos_base'), 2)} → {_fmt(g.get('ended_with_eos_tuned'), 2)}"]
        cells.append(f"{r['lr']:g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
