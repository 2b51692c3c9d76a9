"""The spine of a single-task run: `train` dispatches (multi-task and GRPO have spines of their own), then runs
the stages in order, each a function below: load (data, model, features) -> baselines (the model before) -> prepare
(the method) -> fit (train, validate, test) -> save (the trained weights and figures) -> finish (runs.py).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import data, evaluate, methods, models, predict, tasks
from .config import Config
from .data import augment
from .errors import TunelabError
from .evaluate import forgetting, generative, probe, usercode
from .multitask import train as train_multitask
from .ops import gated, rmsnorm
from .rl import train as train_rl
from .runs import (
    Run,
    begin,
    dir_size_mb,
    finish,
    peak_memory_mb,
    resolve_paths,
    saving_artifact,
    say,
    write_json,
    write_start,
)
from .training import checkpoint, distributed, logs, loop


def train(cfg: Config, overwrite: bool = False, recipe_name: str = "run", on_eval=None,
          resume: Path | None = None) -> Run:
    """`on_eval(record)` is called with every validation record (a sweep's pruner listens there). `resume`: the
    directory of an unfinished run (its config is `cfg`), continued from its last good checkpoint."""
    distributed.setup(models.device_of(cfg.model))
    if cfg.tasks is not None or cfg.task.ONLINE_RL:
        distributed.refuse("multi-task training" if cfg.tasks is not None else cfg.task.type)
    if resume is not None and cfg.task is not None and cfg.task.ONLINE_RL:
        raise TunelabError(f"--resume {resume}: resuming is not supported yet for {cfg.task.type} runs (online RL "
                           f"keeps its own loop); start the run again.")
    if cfg.tasks is not None:
        return train_multitask(cfg, overwrite, recipe_name, resume)
    if cfg.task.ONLINE_RL:  # online RL has its own loop: sample, score, update
        return train_rl(cfg, overwrite, recipe_name)
    t_start, out_path, device, saved, claim = begin(cfg, overwrite, recipe_name, resume)
    # The output folder is this run's until the end (a failure leaves an old run there as it was); a finished run
    # as model.path is a model directory for as long.
    with claim, predict.model_source(cfg.model) as model_cfg:
        work = load(cfg, model_cfg, device, resume)
        summary = baselines(cfg, work)
        prepare(cfg, work)
        # Every input has been checked by now: only a run that can start gets a directory. Only the first process
        # writes it; the others write theirs to scratch, dropped at the end.
        main = distributed.is_main()
        run_dir = claim.make() if main else Path(tempfile.mkdtemp(prefix="tunelab-rank-"))
        if saved is None:
            cfg = resolve_paths(cfg, Path(out_path), model_cfg, work.report)
            write_start(run_dir, cfg, work.report)
        elif main:  # the log goes on from the checkpoint: what was logged after it is logged again
            with open(run_dir / "metrics.jsonl", "r+b") as f:
                f.truncate(saved[1]["log_bytes"])
        result = fit(cfg, work, summary, run_dir if main else Path(out_path), run_dir, saved, on_eval)
        save(cfg, work, summary, run_dir, result, t_start)
        if not main:
            shutil.rmtree(run_dir, ignore_errors=True)
            return Run(Path(out_path).resolve(), summary)
        run_dir = finish(claim, run_dir, summary, cfg)
        say(headline(summary, work.task.HEADLINE))
        return Run(run_dir.resolve(), summary)


@dataclass
class Work:
    """What the stages of one run hand on to each other."""
    task: object
    model: object
    tokenizer: object
    info: dict
    report: dict
    feats: dict
    max_length: int
    shown: list
    device: object
    model_cfg: object
    forgetting_probe: object = None
    forgetting_before: object = None
    samples: dict = field(default_factory=dict)
    held_out: dict = field(default_factory=dict)  # eval.generate: the first rows of validation and test
    generation: dict = field(default_factory=dict)  # their prompts and the base model's replies, per split
    judge: object = None  # eval.judge as a function (prompt rows, replies, whose) -> one score each
    head: list = field(default_factory=list)
    trainable: int = 0
    total: int = 0

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id


# -- the stages ----------------------------------------------------------------------------------------------------


def load(cfg: Config, model_cfg, device, resume: Path | None = None) -> Work:
    """Read and check the data, load the model, tokenize every split. `resume`: the run folder being resumed."""
    task = tasks.get(cfg.task.type)
    loop.resolve_metric(task, cfg.train.metric)
    judge = judge_of(cfg.eval.judge, resume) if cfg.eval.judge else None  # a wrong name costs no data or model loading
    splits, report = task.load_splits(cfg, cfg.train.seed)
    say(data.format_report(report))
    forgetting_probe = forgetting.load(cfg.eval.forgetting, task, cfg.task.type, cfg.train.seed)
    info = task.label_info(splits, cfg)
    with methods.loading(cfg.method, device):  # a quantized base (qlora) is quantized as it loads
        model, tokenizer = task.build_model(model_cfg, info)
    model.to(device)
    # what autograd keeps of a Llama-family block: the gated MLP 2 (tokens, intermediate) tensors, not 4; the
    # norms' outputs not at all (ops/gated.py, ops/rmsnorm.py)
    gated.fuse_gated_mlps(model)
    rmsnorm.fuse_rms_norms(model)
    if cfg.data.augment_copies:
        splits["train"], report["splits"]["train"]["augmented"] = augment.expand(
            splits["train"], cfg.data, cfg.train.seed, model, tokenizer)
        say(f"augmentation: {report['splits']['train']['augmented']}")
    feats, max_length = tasks.encode_splits(cfg, task, model, tokenizer, info, splits, report, say)
    return Work(task, model, tokenizer, info, report, feats, max_length, splits["validation"][: cfg.eval.samples],
                device, model_cfg, forgetting_probe,
                held_out={n: list(r[: cfg.eval.generate]) for n, r in splits.items() if n != "train" and cfg.eval.generate},
                judge=judge)


def baselines(cfg: Config, w: Work) -> dict:
    """The figures of the model before the method touches it: base, linear probe, samples, the forgetting probe."""
    bs, task = cfg.eval.batch_size, w.task
    summary: dict = {"method": cfg.method.name, "task": cfg.task.type, "model": cfg.model.path}
    held_out = {name: f for name, f in w.feats.items() if name != "train"}
    if cfg.eval.base and task.BASE:
        summary["base"] = {name: evaluate.run(w.model, task, f, w.info, bs, w.pad_id, w.device)
                           for name, f in held_out.items()}
    if cfg.eval.linear_probe and task.PROBE:
        summary["linear_probe"] = probe.run(w.model, task, w.feats, w.info, bs, w.pad_id, w.device)
    w.samples["before"] = task.samples(w.model, w.tokenizer, w.shown, w.info, w.device, w.max_length,
                                       cfg.eval.max_new_tokens, evaluate.runner(w.model, task, None, w.pad_id, w.device))
    if w.forgetting_probe:
        w.forgetting_before = forgetting.measure(w.forgetting_probe, w.model, w.tokenizer, w.device, w.max_length, bs)
    if w.held_out:  # eval.generate: the same prompts are answered again after training (fit)
        w.generation["prompts"] = {n: task.generation_rows(rows, w.tokenizer, w.info) for n, rows in w.held_out.items()}
        if cfg.eval.base or cfg.eval.judge:  # a judge's win rate compares the tuned replies with these
            w.generation["base"] = {n: generative.generate(task, w.model, w.tokenizer, p, w.info, cfg.eval,
                                                           cfg.train.seed, w.device, bs)
                                    for n, p in w.generation["prompts"].items()}
        if w.judge:  # checked and used before training, so a judge that fails costs no training
            judged(w.judge, w.generation["prompts"], w.generation["base"], "base")
    return summary


def prepare(cfg: Config, w: Work) -> None:
    """Apply the method (what trains, what stays frozen), gradient checkpointing, DPO's reference log-probs."""
    w.head = w.task.head_modules(w.model)
    w.model = methods.prepare(w.model, cfg.method, w.head)
    if cfg.train.gradient_checkpointing:
        models.enable_gradient_checkpointing(w.model)
    w.task.prepare(w.model, w.feats, cfg, w.pad_id, w.device, cfg.eval.batch_size, say)
    w.trainable, w.total = models.count_params(w.model)
    say(models.trainable_summary(w.model))


def fit(cfg: Config, w: Work, summary: dict, checkpoint_dir: Path, run_dir: Path, saved, on_eval) -> dict:
    """Train, then score the best weights on validation (thresholds tuned there) and test."""
    bs, task = cfg.eval.batch_size, w.task
    write_json(run_dir / "data_report.json", w.report)
    write_json(run_dir / "labels.json", w.info)

    def listener(record: dict) -> None:
        if on_eval is not None and record.get("type") == "eval" and record.get("split") == "validation":
            on_eval(record)

    with logs.open_log(run_dir, cfg, listener) as log:
        stages = methods.get(cfg.method.name).unfreeze_stages(w.model) if cfg.train.unfreeze == "gradual" else []
        if stages:
            say(f"gradual unfreezing: {', '.join(label for label, _ in stages)}, one every {cfg.train.unfreeze_every}"
                f"{'' if cfg.train.unfreeze_every == 'epoch' else ' steps'}")
        # every process takes part in a checkpoint (sharded weights are gathered); the first one writes it
        checkpoints = checkpoint.Checkpoints(checkpoint_dir, cfg.train.keep_checkpoints) \
            if cfg.train.save_checkpoints else None
        result = loop.run(w.model, task, w.feats["train"], w.feats["validation"], w.info, cfg.train, w.head, w.pad_id,
                          w.device, bs, log, stages, checkpoints=checkpoints, resume=saved)
        if result["sharded"]:  # FSDP2 trained it in slices: the rest of the run uses the whole model
            w.model = unsharded(w.model, task, cfg.method, w.model_cfg, w.info, w.head, w.device)
        # The loop scored the restored best weights on validation already; only a run that never had a finite
        # metric needs evaluating again.
        summary["eval"] = result["eval"] or evaluate.run(w.model, task, w.feats["validation"], w.info, bs, w.pad_id,
                                                         w.device)
        w.info, figures = task.finish(w.info, lambda: evaluate.outputs(w.model, task, w.feats["validation"], bs,
                                                                       w.pad_id, w.device), say)
        if figures:  # the task settled something on validation (multilabel's thresholds): the run keeps it
            write_json(run_dir / "labels.json", w.info)
            summary.update(figures)
        if "test" in w.feats:
            summary["test"] = evaluate.run(w.model, task, w.feats["test"], w.info, bs, w.pad_id, w.device)
            log({"type": "eval", "step": result["steps"], "split": "test", **summary["test"]})
    if w.generation:
        prompts, base = w.generation["prompts"], w.generation.get("base", {})
        tuned = {n: generative.generate(task, w.model, w.tokenizer, p, w.info, cfg.eval, cfg.train.seed, w.device, bs)
                 for n, p in prompts.items()}
        summary["generation"] = {side: {n: generative.score(prompts[n], r) for n, r in replies.items()}
                                 for side, replies in (("base", base), ("tuned", tuned)) if replies}
        if w.judge:
            judged(w.judge, prompts, tuned, "tuned")
            summary["generation"]["judge"] = generative.judge(
                {n: {side: [r["judge"] for r in replies[n]] for side, replies in (("base", base), ("tuned", tuned))}
                 for n in prompts if prompts[n]})
        write_json(run_dir / "generations.json", generative.records(prompts, base, tuned))
    return result


def save(cfg: Config, w: Work, summary: dict, run_dir: Path, result: dict, t_start: float) -> None:
    """Forgetting and samples after training, the trained weights, and the run's figures into `summary`."""
    if w.forgetting_probe:
        after = forgetting.measure(w.forgetting_probe, w.model, w.tokenizer, w.device, w.max_length,
                                   cfg.eval.batch_size)
        summary["forgetting"] = forgetting.summary(w.forgetting_probe, w.forgetting_before, after)
        say(forgetting.describe(summary["forgetting"]))
    w.samples["after"] = w.task.samples(w.model, w.tokenizer, w.shown, w.info, w.device, w.max_length,
                                        cfg.eval.max_new_tokens, evaluate.runner(w.model, w.task, None, w.pad_id,
                                                                                 w.device))
    write_json(run_dir / "samples.json", w.samples)
    method = methods.get(cfg.method.name)
    out = run_dir / method.ARTIFACT
    with saving_artifact(out):
        method.save(w.model, out, cfg.model.path, w.head)
        w.tokenizer.save_pretrained(out)
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": len(g["params"])}
              for g in result["optimizer_groups"]]
    summary.update({
        "trainable_params": w.trainable, "total_params": w.total, "trainable_percent": 100 * w.trainable / w.total,
        "train_seconds": result["train_seconds"], "tokens_per_second": result["tokens_per_second"],
        "train_tokens": result["train_tokens"], "peak_memory_mb": peak_memory_mb(w.device),
        "steps": result["steps"], "best_step": result["best_step"], "stopped_early": result["stopped_early"],
        "metric": result["best_metric"], "optimizer_groups": groups,
        "artifact": method.ARTIFACT, "artifact_mb": dir_size_mb(out), "wall_seconds": time.perf_counter() - t_start,
        "device": str(w.device), "torch": torch.__version__,
    })


# -- helpers --------------------------------------------------------------------


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


def judge_of(spec: str, resume: Path | None):
    """eval.judge as a scorer (usercode.judge). A resumed run leaves a function judge out: the folder's config.yaml
    named it, and a run folder, perhaps someone else's, is no opt-in to run code (docs/safety.md). A reward run as
    judge stays: it is loaded with code and pickles off."""
    if resume is not None and not usercode.is_run(spec):
        say(f"note: {resume / 'config.yaml'} names eval.judge={spec!r}, a Python function, and --resume does not run "
            f"code that a run folder names (it may be someone else's; docs/safety.md), so the resumed run's replies "
            f"are not judged. If the function is yours and you trust it, score them once the run has finished: "
            f"`tunelab eval {resume} FILE --generate --judge {spec}`.")
        return None
    return usercode.judge(spec, "eval.judge", predict.reward_scorer)


def judged(judge, prompts: dict, replies: dict, side: str) -> None:
    """eval.judge's score of each reply of one side (base or tuned), added to it as "judge"."""
    for split, rows in replies.items():
        whose = f"the {side} model's replies to the {split} prompts"
        for r, s in zip(rows, judge(prompts[split], [r["reply"] for r in rows], whose)):
            r["judge"] = s


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
    lines += generative.describe(summary.get("generation", {}))
    lines.append(f"trainable {summary['trainable_params']:,} / {summary['total_params']:,} ({summary['trainable_percent']:.2f}%), "
                 f"{summary['train_seconds']:.1f}s, {summary['tokens_per_second']:.0f} tokens/s, peak {summary['peak_memory_mb']:.0f} MB, "
                 f"saved {summary['artifact_mb']:.1f} MB -> {summary.get('artifact')}/")
    return "\n".join(lines)
