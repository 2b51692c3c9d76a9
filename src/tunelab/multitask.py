"""Multi-task runs (`tasks:` in the recipe): several tasks, each with its own data, head and loss weight, on one
shared body, trained by the one loop (training/loop.py: `run_jobs`).

The body is shared by reference: every task's model is built as a single-task run would build it, then its
body's children (embeddings, encoder / layers, final norm) are replaced by the first task's, so one set of body
weights serves all; heads (and a BERT pooler) stay each task's own. The method is applied to the first task's
model and so to the shared children: one adapter for all tasks, or with `multitask.adapters: per_task` one
named adapter per task (methods.named), switched before each task's batches.

Run directory: what a single-task run writes, with `labels.json` = {"tasks": {name: info}}, and
- adapter methods: the shared adapter in `adapter/` (or `adapters/<task>/` per task), every task's head in
  `heads/<task>.safetensors`;
- full / freeze: `tasks/<task>/model/`, a complete transformers model directory per task (the body is stored
  once per task: simple to load anywhere, at the cost of disk).
`tunelab.load(run_dir, task=name)` rebuilds one task for predict / eval / generate (predict.load_task, with the
body sharing and head files defined there).
"""

from __future__ import annotations

import time
from pathlib import Path

from torch import nn

from . import config as config_mod
from . import data, evaluate, methods, models, predict, tasks
from .config import Config
from .methods import precision
from .predict import head_file, save_head, share_body
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
from .training import checkpoint, logs, loop


def train(cfg: Config, overwrite: bool = False, recipe_name: str = "run", resume: Path | None = None) -> Run:
    """`resume`: an unfinished multi-task run directory, continued from its last good checkpoint."""
    t_start, out_path, device, saved, claim = begin(cfg, overwrite, recipe_name, resume)
    # The output folder is this run's until the end (a failure leaves an old run there as it was); a finished run
    # as model.path is a model directory for as long.
    with claim, predict.model_source(cfg.model) as model_cfg:
        bs = cfg.eval.batch_size

        # Every task as a single-task run would read and encode it, then one body for all.
        parts, reports = {}, {}
        for spec in cfg.tasks:
            sub = config_mod.single(cfg, spec.name)
            task = tasks.get(sub.task.type)
            say(f"== task {spec.name} ({sub.task.type}, weight {spec.weight:g})")
            splits, report = task.load_splits(sub, cfg.train.seed)
            say(data.format_report(report))
            info = task.label_info(splits, sub)
            with methods.loading(cfg.method, device):  # a quantized base (qlora) is quantized as it loads
                model, tokenizer = task.build_model(model_cfg, info)
            head = task.head_modules(model)
            if parts:
                first = next(iter(parts.values()))
                share_body(first["model"], model, first["head"], head)
            model.to(device)
            feats, _ = tasks.encode_splits(sub, task, model, tokenizer, info, splits, report, say)
            parts[spec.name] = {"task": task, "model": model, "tokenizer": tokenizer, "info": info, "head": head,
                                "feats": feats, "weight": spec.weight}
            reports[spec.name] = report

        summary: dict = {"method": cfg.method.name, "task": "multitask", "tasks": {n: p["task"].__name__.rsplit(".", 1)[-1]
                                                                                  for n, p in parts.items()},
                         "model": cfg.model.path}
        if cfg.eval.base:
            summary["base"] = {n: {split: evaluate.run(p["model"], p["task"], f, p["info"], bs, p["tokenizer"].pad_token_id, device)
                                   for split, f in p["feats"].items() if split != "train"} for n, p in parts.items()}

        # The method on the first task's model reaches every task through the shared body children.
        names = list(parts)
        owner, owner_head = parts[names[0]]["model"], parts[names[0]]["head"]
        per_task = cfg.multitask.adapters == "per_task"
        if per_task:
            # The method sees the first task's head (so it never wraps it); the named adapters swap no head: every
            # task's head lives in its own model.
            def attach(m):
                m = methods.get(cfg.method.name).apply(m, cfg.method, owner_head)
                for h in owner_head:  # trained below with the other heads; not a base parameter the adapters share
                    m.get_submodule(h).requires_grad_(False)
                return m

            owner = methods.named.record(owner, names[0], cfg.method.name, [], attach)
            for n in names[1:]:
                owner = methods.named.add(owner, n, cfg.method.name, [], attach)
        else:
            owner = methods.prepare(owner, cfg.method, owner_head)
        if cfg.train.gradient_checkpointing:
            models.enable_gradient_checkpointing(owner)
        float32_heads = methods.get(cfg.method.name).TRAINABLE_DTYPE == "float32"
        for p in parts.values():  # every head trains in full (apply froze all but the first task's)
            if float32_heads:  # and in float32 over a bf16 base, as the method's own tensors do
                precision.float32_head(p["model"], p["head"])
            for h in p["head"]:
                p["model"].get_submodule(h).requires_grad_(True)

        # One module holding every trainable parameter; parked per-task adapters first, so that each parameter
        # keeps one name whichever adapter is active.
        store = {}
        if per_task:
            store["adapters"] = nn.ModuleDict({n: nn.ModuleList(m for _, m in e["modules"].values())
                                               for n, e in methods.named.adapters(owner).items()})
        store["tasks"] = nn.ModuleDict({n: p["model"] for n, p in parts.items()})
        container = nn.ModuleDict(store)
        head_names = [f"tasks.{n}.{h}" for n, p in parts.items() for h in p["head"]]
        trainable, total = models.count_params(container)
        say(f"trainable: {trainable:,} / total: {total:,} ({100 * trainable / total:.4f}%) over {len(parts)} tasks")

        run_dir = claim.make()
        if saved is None:
            cfg = resolve_paths(cfg, Path(out_path), model_cfg)
            write_start(run_dir, cfg)
        else:  # the log goes on from the checkpoint
            with open(run_dir / "metrics.jsonl", "r+b") as f:
                f.truncate(saved[1]["log_bytes"])
        write_json(run_dir / "data_report.json", reports)
        write_json(run_dir / "labels.json", {"tasks": {n: p["info"] for n, p in parts.items()}})

        jobs = [loop.Job(n, p["task"], p["model"], p["feats"]["train"], p["feats"]["validation"], p["info"],
                         p["tokenizer"].pad_token_id, p["weight"], n if per_task else None) for n, p in parts.items()]
        with logs.open_log(run_dir, cfg) as log:
            checkpoints = checkpoint.Checkpoints(run_dir, cfg.train.keep_checkpoints) if cfg.train.save_checkpoints else None
            result = loop.run_jobs(container, jobs, cfg.train, head_names, device, bs, log,
                                   cfg.multitask.sampling, cfg.multitask.temperature, owner=owner,
                                   checkpoints=checkpoints, resume=saved)
            summary["eval"], summary["test"] = {}, {}
            for n, p in parts.items():
                if per_task:
                    methods.set_adapter(owner, n)
                pad = p["tokenizer"].pad_token_id
                summary["eval"][n] = evaluate.run(p["model"], p["task"], p["feats"]["validation"], p["info"], bs, pad, device)
                p["info"], figures = p["task"].finish(p["info"], lambda: evaluate.outputs(
                    p["model"], p["task"], p["feats"]["validation"], bs, pad, device), say)
                for key, value in figures.items():  # what the task settled on validation (multilabel's thresholds)
                    summary.setdefault(key, {})[n] = value
                if "test" in p["feats"]:
                    summary["test"][n] = evaluate.run(p["model"], p["task"], p["feats"]["test"], p["info"], bs, pad, device)
                    log({"type": "eval", "step": result["steps"], "split": "test", "task": n, **summary["test"][n]})
            write_json(run_dir / "labels.json", {"tasks": {n: p["info"] for n, p in parts.items()}})

        method = methods.get(cfg.method.name)
        tokenizer = parts[names[0]]["tokenizer"]
        with saving_artifact(run_dir):
            if method.ARTIFACT == "model":
                for n, p in parts.items():
                    out = run_dir / "tasks" / n / "model"
                    method.save(p["model"], out, cfg.model.path, p["head"])
                    p["tokenizer"].save_pretrained(out)
            else:
                for n, p in parts.items():
                    save_head(p["model"], p["head"], head_file(run_dir, n))
                    # Heads are saved apart; frozen now, the method's save does not take the trained head parameters for
                    # base parameters it trained (LoRA's bias rule reads what trains outside the head).
                    for h in p["head"]:
                        p["model"].get_submodule(h).requires_grad_(False)
                if per_task:
                    for n in names:
                        methods.named.save(owner, n, run_dir / "adapters" / n, cfg.model.path)
                        tokenizer.save_pretrained(run_dir / "adapters" / n)
                else:
                    method.save(owner, run_dir / "adapter", cfg.model.path, [])
                    tokenizer.save_pretrained(run_dir / "adapter")

        summary.update({
            "trainable_params": trainable, "total_params": total, "trainable_percent": 100 * trainable / total,
            "train_seconds": result["train_seconds"], "tokens_per_second": result["tokens_per_second"],
            "train_tokens": result["train_tokens"], "peak_memory_mb": peak_memory_mb(device), "steps": result["steps"],
            "best_step": result["best_step"], "stopped_early": result["stopped_early"], "metric": result["best_metric"],
            "artifact": "model" if method.ARTIFACT == "model" else ("adapters" if per_task else "adapter"),
            "artifact_mb": sum(dir_size_mb(run_dir / d) for d in ("adapter", "adapters", "heads", "tasks") if (run_dir / d).is_dir()),
            "wall_seconds": time.perf_counter() - t_start,
            "sampling": cfg.multitask.sampling, "weights": {n: p["weight"] for n, p in parts.items()},
        })
        run_dir = finish(claim, run_dir, summary, cfg)
        say(headline(summary, parts))
        return Run(run_dir.resolve(), summary)


def headline(summary: dict, parts: dict) -> str:
    lines = [f"{'task':14} {'split':11} {'metric':10} {'base':>8} {'tuned':>8}"]
    for n, p in parts.items():
        for split, key in (("validation", "eval"), ("test", "test")):
            tuned = summary.get(key, {}).get(n)
            if not tuned:
                continue
            for metric in p["task"].HEADLINE:
                base = summary.get("base", {}).get(n, {}).get(split, {}).get(metric)
                fmt = lambda v: f"{v:8.4f}" if v is not None else f"{'-':>8}"
                lines.append(f"{n:14} {split:11} {metric:10} {fmt(base)} {fmt(tuned[metric])}")
    lines.append(f"trainable {summary['trainable_params']:,} / {summary['total_params']:,} "
                 f"({summary['trainable_percent']:.2f}%), {summary['train_seconds']:.1f}s, "
                 f"peak {summary['peak_memory_mb']:.0f} MB, saved {summary['artifact_mb']:.1f} MB")
    return "\n".join(lines)

