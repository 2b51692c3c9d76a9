"""Hyperparameter search (`tunelab sweep RECIPE --space sweep.yaml --trials N`) with Optuna.

The space file maps dotted config keys to a range or a list:

    train.lr: {low: 1.0e-5, high: 1.0e-3, log: true}   # float (log scale)
    train.epochs: {low: 1, high: 3}                     # int when both bounds are ints
    method.r: {choices: [4, 8, 16]}

Each trial is a normal run directory `trial_<n>/` under the parent, trained with the recipe plus the sampled
overrides. Every validation evaluation is reported to Optuna, whose median pruner stops trials that fall behind
the others at the same step (after two complete trials); the TPE sampler is seeded by train.seed. The parent
keeps `sweep_summary.json` (every trial: its values, metric, state, run dir) and `best.yaml`, the best trial's
resolved config, ready for `tunelab train`.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from . import atomic, hub, pipeline, runs, tasks
from . import config as config_mod
from .errors import TunelabError
from .training.loop import LOWER_IS_BETTER


def read_space(path: Path) -> dict:
    if not Path(path).is_file():
        raise TunelabError(f"Search space file '{path}' does not exist. Give a YAML file of key: {{low, high}} or "
                           f"{{choices: [...]}} entries, e.g. train.lr: {{low: 1.0e-5, high: 1.0e-3, log: true}}.")
    space = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(space, dict) or not space:
        raise TunelabError(f"Search space file '{path}' must map config keys to ranges, e.g. train.lr: {{low: 1.0e-5, "
                           f"high: 1.0e-3, log: true}}.")
    for key, spec in space.items():
        ok = isinstance(spec, dict) and ("choices" in spec or ("low" in spec and "high" in spec))
        if not ok:
            raise TunelabError(f"Search space file '{path}': '{key}' needs {{low, high[, log, step]}} or {{choices: "
                               f"[...]}}, got {spec!r}.")
    return space


def _suggest(trial, key: str, spec: dict):
    if "choices" in spec:
        return trial.suggest_categorical(key, list(spec["choices"]))
    low, high = spec["low"], spec["high"]
    if isinstance(low, int) and isinstance(high, int) and not spec.get("log"):
        return trial.suggest_int(key, low, high, step=spec.get("step", 1))
    return trial.suggest_float(key, float(low), float(high), log=bool(spec.get("log")))


def run(recipe, overrides: list[str], space_file, trials: int, overwrite: bool = False, echo=print) -> dict:
    try:
        import optuna
    except ImportError:
        raise TunelabError("`tunelab sweep` uses Optuna, which is not installed: `pip install optuna` "
                           "(or `pip install 'tunelab[sweep]'`).") from None
    space = read_space(space_file)
    base = config_mod.load(recipe, overrides)
    for key in space:  # every key must be a real config key: check with the range's low end / first choice
        first = space[key]["choices"][0] if "choices" in space[key] else space[key]["low"]
        config_mod.load(recipe, list(overrides) + [f"{key}={json.dumps(first)}"])
    task = tasks.get(base.task.type) if base.tasks is None else None
    metric = (task.MAIN_METRIC if base.train.metric == "auto" else base.train.metric) if task else \
        (base.train.metric if base.train.metric != "auto" else "score")
    direction = "minimize" if metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER else "maximize"
    parent = runs.expand(base.output_dir or runs.default_output_dir(f"sweep-{Path(recipe).stem if recipe else 'run'}"))
    claim = runs.claim(parent, overwrite, "sweep", base)
    with claim:  # an earlier sweep there stays as it was until this one has finished
        base.model = hub.pinned(base.model)  # a Hub id: every trial trains the commit its branch points at now
        parent = claim.make()
        atomic.write_text(parent / "config.yaml", config_mod.to_yaml(base), "the sweep's config")

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction=direction, sampler=optuna.samplers.TPESampler(seed=base.train.seed),
                                    pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
        rows = []

        def objective(trial):
            values = {k: _suggest(trial, k, spec) for k, spec in space.items()}
            out = parent / f"trial_{trial.number}"
            cfg = config_mod.load(recipe, list(overrides) + [f"{k}={json.dumps(v)}" for k, v in values.items()]
                                  + [f"output_dir={out}"])
            if cfg.model.path == base.model.path and "model.revision" not in values:
                cfg.model.revision = base.model.revision
            echo(f"== trial {trial.number}: " + ", ".join(f"{k}={v}" for k, v in values.items()))

            def on_eval(record: dict) -> None:
                if metric in record:
                    trial.report(record[metric], record["step"])
                    if trial.should_prune():
                        raise optuna.TrialPruned()

            row = {"trial": trial.number, **values, "run": out.name}
            try:
                result = pipeline.train(cfg, on_eval=on_eval)
            except optuna.TrialPruned:
                rows.append({**row, "state": "pruned", metric: None})
                raise
            value = result.summary["metric"][metric]
            rows.append({**row, "state": "complete", metric: value})
            return value

        study.optimize(objective, n_trials=trials)
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not complete:
            raise TunelabError(f"No trial of the sweep in '{parent}' completed; see its trial_* directories.")
        best = study.best_trial
        best_cfg = config_mod.load(parent / f"trial_{best.number}" / "config.yaml")
        atomic.write_text(parent / "best.yaml", config_mod.to_yaml(best_cfg), "the best trial's config")
        summary = {"metric": metric, "direction": direction, "best_trial": best.number, "best_value": best.value,
                   "best_params": best.params, "trials": rows}
        atomic.write_json(parent / "sweep_summary.json", summary, "the sweep summary")
        parent = claim.finish()
    keys = list(space)
    echo(f"{'trial':>5}  " + "  ".join(f"{k:>14}" for k in keys) + f"  {metric:>10}  state")
    for r in rows:
        value = f"{r[metric]:.4f}" if r[metric] is not None else "-"
        echo(f"{r['trial']:>5}  " + "  ".join(f"{str(r[k]):>14.14}" for k in keys) + f"  {value:>10}  {r['state']}")
    echo(f"best: trial {best.number} ({metric} {best.value:.4f}); config -> {parent / 'best.yaml'}")
    return summary
