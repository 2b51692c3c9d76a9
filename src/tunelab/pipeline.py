"""The spine: config -> data -> model -> method -> train -> evaluate -> save -> summary.

Read top to bottom, `train` is the whole story of a run.
"""

from __future__ import annotations

import json
import random
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import config as config_mod
from . import data, evaluate, methods, models, tasks, versions
from .config import Config
from .data import augment, stream
from .errors import TunelabError
from .evaluate import forgetting, probe
from .training import checkpoint, distributed, logs, loop

RUN_FILES = ("config.yaml", "summary.json", "metrics.jsonl", "data_report.json", "labels.json", "samples.json")


@dataclass
class Run:
    dir: Path
    summary: dict


def train(cfg: Config, overwrite: bool = False, recipe_name: str = "run", on_eval=None,
          resume: Path | None = None) -> Run:
    """`on_eval(record)` is called with every validation record (a sweep's pruner listens there). `resume`: the
    directory of an unfinished run (its config is `cfg`), continued from its last good checkpoint."""
    distributed.setup(models.device_of(cfg.model))
    if cfg.tasks is not None or cfg.task.type == "grpo":
        distributed.refuse("multi-task training" if cfg.tasks is not None else "grpo")
    if resume is not None and cfg.task is not None and cfg.task.type == "grpo":
        raise TunelabError(f"--resume {resume}: resuming is not supported yet for grpo runs (online RL keeps its own "
                           f"loop); start the run again.")
    if cfg.tasks is not None:
        from .multitask import train as train_multitask

        return train_multitask(cfg, overwrite, recipe_name, resume)
    if cfg.task.type == "grpo":  # online RL has its own loop: sample, score, update
        from .rl import train as train_rl

        return train_rl(cfg, overwrite, recipe_name)
    t_start, out_path, device, saved = begin(cfg, overwrite, recipe_name, resume)

    task = tasks.get(cfg.task.type)
    loop.resolve_metric(task, cfg.train.metric)
    splits, report = task.load_splits(cfg, cfg.train.seed)
    say(data.format_report(report))
    forgetting_probe = forgetting.load(cfg.eval.forgetting, cfg.task.type, cfg.train.seed)
    info = task.label_info(splits, cfg)
    model, tokenizer = task.build_model(cfg.model, info)
    model.to(device)
    if cfg.data.augment_copies:
        splits["train"], report["splits"]["train"]["augmented"] = augment.expand(
            splits["train"], cfg.data, cfg.train.seed, model, tokenizer)
        say(f"augmentation: {report['splits']['train']['augmented']}")
    feats, max_length = encode_splits(cfg, task, model, tokenizer, info, splits, report)
    held_out = {name: f for name, f in feats.items() if name != "train"}
    pad_id, bs = tokenizer.pad_token_id, cfg.eval.batch_size
    shown = splits["validation"][: cfg.eval.samples]

    # The baselines see the model before the method touches it.
    summary: dict = {"method": cfg.method.name, "task": cfg.task.type, "model": cfg.model.path}
    if cfg.eval.base and getattr(task, "BASE", True):  # regression: an untrained head; the ridge probe is the baseline
        summary["base"] = {name: evaluate.run(model, task, f, info, bs, pad_id, device) for name, f in held_out.items()}
    if cfg.eval.linear_probe and task.PROBE:
        summary["linear_probe"] = probe.run(model, task, feats, info, bs, pad_id, device)
    samples = {"before": task.samples(model, tokenizer, shown, info, device, max_length, cfg.eval.max_new_tokens)}
    if forgetting_probe:
        before = forgetting.measure(forgetting_probe, model, tokenizer, device, max_length, bs)

    method = methods.get(cfg.method.name)
    head = task.head_modules(model)
    model = methods.prepare(model, cfg.method, head)
    if cfg.train.gradient_checkpointing:
        models.enable_gradient_checkpointing(model)
    if hasattr(task, "precompute_reference") and task.reference_mode(cfg) == "precomputed":
        say("reference log-probs: computing them once with the starting model")
        task.precompute_reference(model, feats, pad_id, device, bs)
    trainable, total = models.count_params(model)
    say(models.trainable_summary(model))

    # Every input has been checked by now: only a run that can start gets a directory.
    # Only the first process writes the run directory; the others write theirs to scratch, dropped at the end.
    main = distributed.is_main()
    if saved is None:
        run_dir = make_run_dir(out_path, overwrite) if main else Path(tempfile.mkdtemp(prefix="tunelab-rank-"))
        cfg = resolve_paths(cfg, Path(out_path))
        (run_dir / "config.yaml").write_text(config_mod.to_yaml(cfg), encoding="utf-8")
        write_json(run_dir / "versions.json", versions.current())
    else:  # the log goes on from the checkpoint: what was logged after it is logged again
        run_dir = Path(resume) if main else Path(tempfile.mkdtemp(prefix="tunelab-rank-"))
        if main:
            with open(run_dir / "metrics.jsonl", "r+b") as f:
                f.truncate(saved[1]["log_bytes"])
    write_json(run_dir / "data_report.json", report)
    write_json(run_dir / "labels.json", info)

    def listener(record: dict) -> None:
        if on_eval is not None and record.get("type") == "eval" and record.get("split") == "validation":
            on_eval(record)

    with logs.open_log(run_dir, cfg.train.log_to, listener) as log:
        stages = methods.freeze.unfreeze_stages(model) if cfg.train.unfreeze == "gradual" else []
        if stages:
            say(f"gradual unfreezing: {', '.join(label for label, _ in stages)}, one every {cfg.train.unfreeze_every}"
                f"{'' if cfg.train.unfreeze_every == 'epoch' else ' steps'}")
        # every process takes part in a checkpoint (sharded weights are gathered); the first one writes it
        checkpoints = checkpoint.Checkpoints(Path(out_path), cfg.train.keep_checkpoints) \
            if cfg.train.save_checkpoints else None
        result = loop.run(model, task, feats["train"], feats["validation"], info, cfg.train, head, pad_id, device, bs,
                          log, stages, checkpoints=checkpoints, resume=saved)
        if result["sharded"]:  # FSDP2 trained it in slices: the rest of the run uses the whole model
            model = unsharded(model, task, cfg, info, head, device)
        # The loop scored the restored best weights on validation already; only a run that never had a finite
        # metric needs evaluating again.
        summary["eval"] = result["eval"] or evaluate.run(model, task, feats["validation"], info, bs, pad_id, device)
        if info.get("tune_threshold"):  # multilabel, task.threshold=tuned: per-label thresholds from validation
            info = task.calibrate(*evaluate.outputs(model, task, feats["validation"], bs, pad_id, device), info)
            write_json(run_dir / "labels.json", info)
            summary["thresholds"] = info["threshold"]
            say("thresholds tuned on validation: " + ", ".join(f"{k} {v:g}" for k, v in info["threshold"].items()))
        if "test" in feats:
            summary["test"] = evaluate.run(model, task, feats["test"], info, bs, pad_id, device)
            log({"type": "eval", "step": result["steps"], "split": "test", **summary["test"]})

    if forgetting_probe:
        after = forgetting.measure(forgetting_probe, model, tokenizer, device, max_length, bs)
        summary["forgetting"] = forgetting.summary(forgetting_probe, before, after)
        say(forgetting.describe(summary["forgetting"]))
    samples["after"] = task.samples(model, tokenizer, shown, info, device, max_length, cfg.eval.max_new_tokens)
    write_json(run_dir / "samples.json", samples)
    out = run_dir / method.ARTIFACT
    method.save(model, out, cfg.model.path, head)
    tokenizer.save_pretrained(out)

    summary.update({
        "trainable_params": trainable, "total_params": total, "trainable_percent": 100 * trainable / total,
        "train_seconds": result["train_seconds"], "tokens_per_second": result["tokens_per_second"],
        "train_tokens": result["train_tokens"], "peak_memory_mb": peak_memory_mb(device),
        "steps": result["steps"], "best_step": result["best_step"], "stopped_early": result["stopped_early"],
        "metric": result["best_metric"], "optimizer_groups": [{k: v for k, v in g.items() if k != "params"} | {"params": len(g["params"])} for g in result["optimizer_groups"]],
        "artifact": method.ARTIFACT, "artifact_mb": dir_size_mb(out), "wall_seconds": time.perf_counter() - t_start,
        "device": str(device), "torch": torch.__version__,
    })
    write_json(run_dir / "summary.json", summary)
    drop_checkpoints(run_dir, cfg)
    if not main:
        shutil.rmtree(run_dir, ignore_errors=True)
        return Run(Path(out_path).resolve(), summary)
    write_report(run_dir)
    say(headline(summary, task.HEADLINE))
    return Run(run_dir.resolve(), summary)


# -- helpers --------------------------------------------------------------------

def encode_splits(cfg: Config, task, model, tokenizer, info: dict, splits: dict, report: dict) -> tuple[dict, int]:
    """Tokenize every split (counts into the report), pack train when asked; returns (features, max_length)."""
    max_length = models.max_input_length(model, tokenizer, cfg.data.max_length, getattr(cfg.method, "num_virtual_tokens", 0))
    if max_length < cfg.data.max_length:
        say(f"note: data.max_length={cfg.data.max_length} exceeds what the model takes; inputs are cut at {max_length} tokens")
    feats = {}
    for name, rows in splits.items():
        if isinstance(rows, stream.Rows):  # data.streaming: tokenised again whenever the loop reads them
            feats[name], report["splits"][name]["tokens"] = stream.encode(rows, task, tokenizer, info, max_length)
        else:
            feats[name], report["splits"][name]["tokens"] = task.encode(rows, tokenizer, info, max_length)
        say(f"{name} tokens: {data.format_tokens(report['splits'][name]['tokens'])}")
        if not feats[name]:
            raise TunelabError(f"No {name} example is left after tokenisation ({report['splits'][name]['tokens']}); "
                               f"raise data.max_length or set data.truncation=cut.")
    if cfg.data.packing:
        rows_before = len(feats["train"])
        feats["train"] = task.pack(feats["train"], max_length)
        report["splits"]["train"]["packed_rows"] = len(feats["train"])
        say(f"packing: {rows_before} training examples in {len(feats['train'])} rows of up to {max_length} tokens")
    return feats, max_length


def unsharded(model, task, cfg: Config, info: dict, head: list[str], device):
    """The trained weights of a model sharded across processes, in a fresh whole copy of it."""
    state = distributed.plain_state(model)
    whole, _ = task.build_model(cfg.model, info)
    whole = methods.prepare(whole.to(device), cfg.method, head)
    missing = set(dict(whole.named_parameters())) - set(state)
    if missing:
        raise TunelabError(f"Internal error: the sharded model lacks {sorted(missing)[:3]} when gathered whole.")
    whole.load_state_dict(state, strict=False)
    return whole.eval()


def drop_checkpoints(run_dir: Path, cfg: Config) -> None:
    """A finished run's checkpoints serve nothing (--resume takes only unfinished runs) unless asked to stay."""
    if not cfg.train.keep_finished_checkpoints:
        shutil.rmtree(run_dir / checkpoint.DIR, ignore_errors=True)


def resumable(run_dir: Path):
    """The last good checkpoint of an unfinished run, or a clear error saying why it cannot be resumed."""
    run_dir = Path(run_dir)
    check_resumable(run_dir)
    found = checkpoint.Checkpoints(run_dir, 1).latest(say)
    if found is None:
        raise TunelabError(f"--resume {run_dir}: the run has no usable checkpoint in {run_dir / checkpoint.DIR} (it "
                           f"stopped before its first evaluation, or train.save_checkpoints was off). Start it again; "
                           f"train.checkpoint_every=N checkpoints every N steps.")
    return found


def check_resumable(run_dir: Path) -> None:
    if not (run_dir / "config.yaml").is_file():
        raise TunelabError(f"--resume {run_dir}: not a tunelab run directory (no config.yaml). Give the output_dir "
                           f"of the run that stopped.")
    if (run_dir / "summary.json").is_file():
        raise TunelabError(f"--resume {run_dir}: that run finished (summary.json is there), so there is nothing to "
                           f"resume. To train further, start a new run with model.path={run_dir}.")


def begin(cfg: Config, overwrite: bool, recipe_name: str, resume: Path | None = None):
    """(start time, output dir, device, the checkpoint to resume from or None) of a run; fails before any work when
    the output dir or a logger is wrong, but creates nothing until the inputs are known good. Seeds everything."""
    t_start = time.perf_counter()
    if resume is not None:
        saved = resumable(resume)
        logs.check(cfg.train.log_to)
        versions.check(resume, "resuming", say)
        seed_everything(cfg.train.seed)
        return t_start, str(resume), models.device_of(cfg.model), saved
    out_path = distributed.broadcast(cfg.output_dir or default_output_dir(recipe_name))  # one name for all processes
    if distributed.is_main():
        check_run_dir(out_path, overwrite)
    logs.check(cfg.train.log_to)
    seed_everything(cfg.train.seed)
    return t_start, out_path, models.device_of(cfg.model), None


def default_output_dir(recipe_name: str) -> str:
    return f"runs/{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_run_dir(path: str, overwrite: bool) -> None:
    """An existing non-empty output dir is only replaced with --overwrite, and only if it is a tunelab run."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise TunelabError(f"output_dir '{path}' exists and is a file, not a directory. Choose another output_dir=... .")
    if p.is_dir() and any(p.iterdir()):
        if not overwrite:
            raise TunelabError(
                f"Output directory '{path}' already exists and is not empty ({', '.join(sorted(x.name for x in p.iterdir())[:6])}). "
                f"Choose a new output_dir=..., or pass --overwrite to replace that run."
            )
        if not (p / "config.yaml").is_file() or not any((p / f).exists() for f in RUN_FILES[1:]):
            raise TunelabError(
                f"--overwrite refused: '{path}' does not look like a tunelab run directory (no config.yaml/metrics.jsonl), "
                f"so deleting it could lose your files. Choose an empty or new output_dir=... ."
            )


def make_run_dir(path: str, overwrite: bool) -> Path:
    check_run_dir(path, overwrite)
    p = Path(path)
    if p.is_dir() and any(p.iterdir()):
        shutil.rmtree(p)
    p.mkdir(parents=True, exist_ok=True)
    return p


def resolve_paths(cfg: Config, run_dir: Path) -> Config:
    """Make file paths absolute so the saved config works from any directory."""
    cfg = cfg.model_copy(deep=True)
    cfg.output_dir = str(run_dir.resolve())
    if Path(cfg.model.path).exists():
        cfg.model.path = str(Path(cfg.model.path).resolve())
    if getattr(cfg.method, "init_from", None) and Path(cfg.method.init_from).exists():
        cfg.method.init_from = str(Path(cfg.method.init_from).resolve())
    for data_cfg in [cfg.data] if cfg.data is not None else [t.data for t in cfg.tasks]:
        for key in ("train", "validation", "test"):
            value = getattr(data_cfg, key)
            if value and Path(value).exists():
                setattr(data_cfg, key, str(Path(value).resolve()))
    return cfg


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss() / 2**20


def peak_rss() -> int:
    """This process's peak resident set in bytes. VmHWM, not ru_maxrss: a child's ru_maxrss starts at its
    parent's RSS at fork (Linux keeps it across exec), so a run started by a large parent (`tunelab compare`)
    would report the parent's peak."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):  # not Linux
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def write_report(run_dir: Path) -> None:
    """report.html is derived from the run's files; a failure there must not cost the finished run."""
    from . import report

    try:
        report.write_run(run_dir)
    except Exception as e:  # noqa: BLE001  (the run is saved; say what went wrong and go on)
        say(f"warning: report.html could not be written ({type(e).__name__}: {e}); "
            f"`tunelab report {run_dir}` tries again.")


def dir_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def say(msg: str) -> None:
    if distributed.is_main():
        print(msg, file=sys.stdout, flush=True)


def headline(summary: dict, metrics: tuple[str, ...]) -> str:
    width = 12 if len(metrics) == 1 else 12 + max(len(m) for m in metrics)
    lines = [f"{'split':{width}} {'base':>8} {'probe':>8} {'tuned':>8}" + (f"   ({metrics[0]})" if len(metrics) == 1 else "")]
    fmt = lambda v: f"{v:8.4f}" if v is not None else f"{'-':>8}"
    for split in ("validation", "test"):
        tuned = summary.get("eval" if split == "validation" else "test")
        if tuned is None:
            continue
        for metric in metrics:
            base = summary.get("base", {}).get(split, {}).get(metric)
            lp = summary.get("linear_probe", {}).get(split, {}).get(metric)
            name = split if len(metrics) == 1 else f"{split} {metric}"
            lines.append(f"{name:{width}} {fmt(base)} {fmt(lp)} {fmt(tuned[metric])}")
    lines.append(f"trainable {summary['trainable_params']:,} / {summary['total_params']:,} ({summary['trainable_percent']:.2f}%), "
                 f"{summary['train_seconds']:.1f}s, {summary['tokens_per_second']:.0f} tokens/s, peak {summary['peak_memory_mb']:.0f} MB, "
                 f"saved {summary['artifact_mb']:.1f} MB -> {summary.get('artifact')}/")
    return "\n".join(lines)
