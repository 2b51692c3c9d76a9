"""`task.type: grpo` — online RL after sft: the policy answers prompts, a reward scores the answers, GRPO updates
the policy (training/grpo.py). A run directory like any other: config, metrics.jsonl, summary (mean reward of
sampled answers to the validation prompts before and after), report, and the method's artifact (generate works).

Data: rows with a `prompt` (a string, or chat messages ending on a user turn), rendered with the sft template and
its generation prompt. Reward: `task.reward_function` ('module:function' or 'path/to/file.py:function', called
with the prompts and completions, returning floats) or `task.reward_model` (a tunelab reward run, which scores
each completion as the reply to its prompt).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from . import methods, models, predict
from .config import Config
from .data import chat
from .data.sources import describe, read_records
from .data.split import random_split
from .errors import TunelabError
from .evaluate import usercode
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
from .tasks import causal_lm
from .training import grpo, logs


def reward_name(task_cfg) -> str:
    """How messages name the reward: the config key and its value."""
    if task_cfg.reward_model:
        return f"task.reward_model={task_cfg.reward_model!r}"
    return f"task.reward_function={task_cfg.reward_function!r}"


def load_reward(task_cfg):
    """The reward as a function (prompts, completions) -> list of floats, as the user wrote it (unchecked: `train`
    tries it on a sample before the run and wraps its calls with grpo.checked)."""
    if task_cfg.reward_model:
        return predict.reward_scorer(task_cfg.reward_model, "task.reward_model")
    return usercode.load(task_cfg.reward_function, "task.reward_function",
                         "function(prompts, completions) that returns one number per completion")


def _prompts(path: str, key: str, data_cfg) -> list:
    """The prompts of a grpo data file or dataset (`data_cfg` picks a dataset's config, revision and split)."""
    out = []
    for r in read_records(path, key, data_cfg):
        prompt = r["record"].get("prompt")
        if isinstance(prompt, str) and prompt.strip():
            out.append([{"role": "user", "content": prompt}])
        elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            out.append(prompt)
        else:
            raise TunelabError(f"{describe(path, key, data_cfg)} row {r['row']}: no usable 'prompt' (a non-empty string, or "
                               f"chat messages ending on a user turn). Fix or remove the row.")
    return out


def _own_text(messages: list) -> str:
    """A short completion to try the reward on: the prompt's own last message, cut to 200 characters."""
    content = messages[-1].get("content") if messages and isinstance(messages[-1], dict) else None
    return str(content or "")[:200]


def mean_reward(model, tokenizer, prompts: list[str], reward_fn, cfg, add_special: bool) -> float:
    _, rewards = grpo.sample(model, tokenizer, prompts, reward_fn, cfg.task.group_size, cfg.eval.max_new_tokens,
                             cfg.task.temperature, add_special)
    return statistics.fmean(rewards)


def train(cfg: Config, overwrite: bool = False, recipe_name: str = "run") -> Run:
    t_start, out_path, device, _, claim = begin(cfg, overwrite, recipe_name)
    # The output folder is this run's until the end (a failure leaves an old run there as it was); a finished run
    # as model.path is a model directory for as long.
    with claim, predict.model_source(cfg.model) as model_cfg:
        return _train(cfg, model_cfg, claim, t_start, out_path, device)


def _train(cfg: Config, model_cfg, claim, t_start: float, out_path: str, device) -> Run:
    reward = load_reward(cfg.task)
    reward_fn = grpo.checked(reward, reward_name(cfg.task))  # every call during the run is checked too
    train_rows = _prompts(cfg.data.train, "data.train", cfg.data)
    if cfg.data.validation:
        val_rows = _prompts(cfg.data.validation, "data.validation", cfg.data)
    else:
        train_rows, val_rows = random_split(train_rows, cfg.data.val_fraction, cfg.train.seed, cfg.data.train)
    info = {"task": "sft", "template": cfg.task.template, "train_on_prompt": False, "truncation": cfg.data.truncation}
    with methods.loading(cfg.method, device):  # a quantized base (qlora) is quantized as it loads
        model, tokenizer = causal_lm.build_model(model_cfg, info)
    model.to(device)
    add_special = info["template"] == "alpaca"
    render = lambda rows: [chat.render(m, info["template"], tokenizer, add_generation_prompt=True)[0] for m in rows]
    train_prompts, val_prompts = render(train_rows), render(val_rows)
    grpo.try_reward(reward, reward_name(cfg.task), train_prompts[:2], [_own_text(m) for m in train_rows[:2]])
    say(f"grpo: {len(train_prompts)} training prompts, {len(val_prompts)} validation prompts, "
        f"{cfg.task.group_size} samples each")

    summary: dict = {"method": cfg.method.name, "task": "grpo", "model": cfg.model.path,
                     "base": {"validation": {"reward": mean_reward(model, tokenizer, val_prompts, reward_fn, cfg, add_special)}}}
    model = methods.prepare(model, cfg.method, [])
    trainable, total = models.count_params(model)
    run_dir = claim.make()
    cfg = resolve_paths(cfg, Path(out_path), model_cfg)
    write_start(run_dir, cfg)
    write_json(run_dir / "labels.json", info)
    steps = cfg.train.max_steps or max(1, round(cfg.train.epochs * len(train_prompts) / cfg.train.batch_size))
    t_train = time.perf_counter()
    with logs.open_log(run_dir, cfg) as log:
        history = grpo.train(model, tokenizer, train_prompts, reward_fn, steps, lr=cfg.train.lr,
                             prompts_per_step=cfg.train.batch_size, seed=cfg.train.seed, log=log,
                             group_size=cfg.task.group_size, max_new_tokens=cfg.eval.max_new_tokens,
                             temperature=cfg.task.temperature, beta=cfg.task.beta,
                             max_grad_norm=cfg.train.max_grad_norm or 0.0, add_special_tokens=add_special)
        train_seconds = time.perf_counter() - t_train
        summary["eval"] = {"reward": mean_reward(model, tokenizer, val_prompts, reward_fn, cfg, add_special)}
        log({"type": "eval", "step": steps, "split": "validation", **summary["eval"]})
    method = methods.get(cfg.method.name)
    out = run_dir / method.ARTIFACT
    with saving_artifact(out):
        method.save(model, out, cfg.model.path, [])
        tokenizer.save_pretrained(out)
    tokens = sum(h["completion_tokens"] for h in history)
    summary.update({
        "trainable_params": trainable, "total_params": total, "trainable_percent": 100 * trainable / total,
        "train_seconds": train_seconds, "tokens_per_second": tokens / max(train_seconds, 1e-9), "train_tokens": tokens,
        "peak_memory_mb": peak_memory_mb(device), "steps": steps, "metric": summary["eval"]["reward"],
        "artifact": method.ARTIFACT, "artifact_mb": dir_size_mb(out), "wall_seconds": time.perf_counter() - t_start,
        "device": str(device),
    })
    run_dir = finish(claim, run_dir, summary, cfg)
    say(f"validation mean reward: base {summary['base']['validation']['reward']:.4f} -> tuned "
        f"{summary['eval']['reward']:.4f} ({steps} steps, {train_seconds:.1f}s)")
    return Run(run_dir.resolve(), summary)
