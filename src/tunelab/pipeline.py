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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import config as config_mod
from . import atomic, data, evaluate, methods, models, predict, runs, tasks, versions
from .config import Config
from .data import augment, stream
from .errors import TunelabError
from .evaluate import forgetting, probe
from .training import checkpoint, distributed, logs, loop

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
    t_start, out_path, device, saved, claim = begin(cfg, overwrite, recipe_name, resume)
    # The output folder is this run's until the end (a failure leaves an old run there as it was); a finished run
    # as model.path is a model directory for as long.
    with claim, predict.model_source(cfg.model) as model_cfg:
        task = tasks.get(cfg.task.type)
        loop.resolve_metric(task, cfg.train.metric)
        splits, report = task.load_splits(cfg, cfg.train.seed)
        say(data.format_report(report))
        forgetting_probe = forgetting.load(cfg.eval.forgetting, cfg.task.type, cfg.train.seed)
        info = task.label_info(splits, cfg)
        model, tokenizer = task.build_model(model_cfg, info)
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
        run_dir = claim.make() if main else Path(tempfile.mkdtemp(prefix="tunelab-rank-"))
        if saved is None:
            cfg = resolve_paths(cfg, Path(out_path))
            write_start(run_dir, cfg)
        elif main:  # the log goes on from the checkpoint: what was logged after it is logged again
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
            checkpoints = checkpoint.Checkpoints(run_dir if main else Path(out_path), cfg.train.keep_checkpoints) \
                if cfg.train.save_checkpoints else None
            result = loop.run(model, task, feats["train"], feats["validation"], info, cfg.train, head, pad_id, device, bs,
                              log, stages, checkpoints=checkpoints, resume=saved)
            if result["sharded"]:  # FSDP2 trained it in slices: the rest of the run uses the whole model
                model = unsharded(model, task, cfg.method, model_cfg, info, head, device)
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
        with saving_artifact(out):
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
        if not main:
            shutil.rmtree(run_dir, ignore_errors=True)
            return Run(Path(out_path).resolve(), summary)
        run_dir = finish(claim, run_dir, summary, cfg)
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


def unsharded(model, task, method_cfg, model_cfg, info: dict, head: list[str], device):
    """The trained weights of a model sharded across processes, in a fresh whole copy of it."""
    state = distributed.plain_state(model)
    whole, _ = task.build_model(model_cfg, info)
    whole = methods.prepare(whole.to(device), method_cfg, head)
    missing = set(dict(whole.named_parameters())) - set(state)
    if missing:
        raise TunelabError(f"Internal error: the sharded model lacks {sorted(missing)[:3]} when gathered whole.")
    whole.load_state_dict(state, strict=False)
    return whole.eval()


def write_start(run_dir: Path, cfg: Config) -> None:
    """The first files of a new run: its resolved config and the library versions it is made with."""
    atomic.write_text(run_dir / "config.yaml", config_mod.to_yaml(cfg), "the run's config")
    write_json(run_dir / "versions.json", versions.current())


@contextmanager
def saving_artifact(out: Path):
    """`with saving_artifact(folder): save(...)`: the trained weights are on disk (fsynced) before summary.json says
    the run finished, and a failed write (a full disk) is one paragraph, not a traceback."""
    try:
        yield
        atomic.fsync_tree(out)
    except atomic.WRITE_ERRORS as e:
        raise atomic.write_error(e, out, "the trained weights") from None


def finish(claim: runs.Claim, run_dir: Path, summary: dict, cfg: Config) -> Path:
    """summary.json marks the run finished (its artifact is on disk already); only then are checkpoints dropped and,
    when the run replaces an old one, the new folder swapped in and the old one deleted, last. report.html is
    derived from the finished run, in its final place."""
    write_json(run_dir / "summary.json", summary)
    drop_checkpoints(run_dir, cfg)
    run_dir = claim.finish()
    write_report(run_dir)
    return run_dir


def drop_checkpoints(run_dir: Path, cfg: Config) -> None:
    """A finished run's checkpoints serve nothing (--resume takes only unfinished runs) unless asked to stay."""
    if not cfg.train.keep_finished_checkpoints:
        shutil.rmtree(run_dir / checkpoint.DIR, ignore_errors=True)


def resumable(run_dir: Path, anyway: bool | None = None):
    """The last good checkpoint of an unfinished run, or a clear error saying why it cannot be resumed. `anyway`:
    see check_resumable (None: tunelab.resume has compared the run with its checkpoint already). Checkpoints left
    half-written by the run that stopped are removed."""
    run_dir = Path(run_dir)
    check_resumable(run_dir, anyway)
    checkpoints = checkpoint.Checkpoints(run_dir, 1, record=False)
    checkpoints.clean()
    found = checkpoints.latest(say)
    if found is None:
        raise TunelabError(f"--resume {run_dir}: the run has no usable checkpoint in {run_dir / checkpoint.DIR} (it "
                           f"stopped before its first evaluation, or train.save_checkpoints was off). Start it again; "
                           f"train.checkpoint_every=N checkpoints every N steps.")
    return found


def check_resumable(run_dir: Path, anyway: bool | None = False) -> None:
    """Refuse a folder that is not an unfinished run, and a run whose config.yaml, data files or model changed since
    its newest checkpoint was written (fingerprint.py says what counts), unless `anyway` (--resume-anyway): then say
    what changed and go on. anyway=None: only the first check."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise TunelabError(f"--resume {run_dir}: not a tunelab run directory (no config.yaml). Give the output_dir "
                           f"of the run that stopped.")
    if finished(run_dir):
        raise TunelabError(f"--resume {run_dir}: that run finished (summary.json is there), so there is nothing to "
                           f"resume. To train further, start a new run with model.path={run_dir}.")
    if (run_dir / "summary.json").exists():
        say(f"note: {run_dir / 'summary.json'} is not a complete summary (cut short by a crash or a full disk while "
            f"it was written by a tunelab from before summaries were written atomically); the run is resumed from its "
            f"checkpoints and writes it again.")
    found = None if anyway is None else checkpoint.Checkpoints(run_dir, 1, record=False).changes()
    if found is None:  # not asked, or no checkpoint: resumable says so
        return
    path, changed = found
    if changed is None:
        say(f"note: checkpoint {path.name} was written before tunelab recorded what a run is made of, so changes to "
            f"config.yaml, the data files or the model since then cannot be detected; resuming as it is.")
    elif changed and not anyway:
        raise TunelabError(f"--resume {run_dir}: the run changed since its checkpoint {path.name} was written: "
                           f"{'; '.join(changed)}. Going on would continue steps trained one way with another, so "
                           f"it is not resumed. Put {run_dir / 'config.yaml'} (and the files) back as they were, "
                           f"start a new run with the new settings, or pass --resume-anyway to go on with them.")
    elif changed:
        say(f"--resume-anyway: going on from {path.name} although the run changed since: {'; '.join(changed)}")


def finished(run_dir: Path) -> bool:
    """summary.json, written last and atomically, says a run finished; one cut short says nothing."""
    try:
        return isinstance(json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def begin(cfg: Config, overwrite: bool, recipe_name: str, resume: Path | None = None, kind: str = "run"):
    """(start time, output dir, device, the checkpoint to resume from or None, the claim on the output folder) of a
    run; fails before any work when the output dir or a logger is wrong, but creates nothing until the inputs are
    known good. Seeds everything. The claim holds the folder's lock: use it as `with claim:` around the run."""
    t_start = time.perf_counter()
    main = distributed.is_main()
    if resume is not None:
        out_path = str(runs.expand(resume))
        claim = runs.claim_resume(out_path) if main else runs.Claim(Path(out_path), kind, replace=False)
    else:
        out_path = distributed.broadcast(str(runs.expand(cfg.output_dir or default_output_dir(recipe_name))))
        claim = runs.claim(out_path, overwrite, kind, cfg) if main else runs.Claim(Path(out_path), kind, replace=False)
    with claim.released_on_error():
        saved = resumable(Path(out_path)) if resume is not None else None
        if resume is not None:
            versions.check(Path(out_path), "resuming", say)
        logs.check(cfg.train.log_to)
        seed_everything(cfg.train.seed)
        return t_start, out_path, models.device_of(cfg.model), saved, claim


def default_output_dir(recipe_name: str) -> str:
    return f"runs/{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"


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
    atomic.write_json(path, obj, f"the run's {path.name}")


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
