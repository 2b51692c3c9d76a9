"""Generative evaluation (eval.generate, `tunelab eval RUN FILE --generate`): a model writes replies to held-out
prompts and they are scored against the reference replies (ops/textmetrics.py: exact match, token F1, ROUGE-L,
BLEU, reply length, share ended with EOS). A run does it with the base model and again with the tuned one on the same
prompts, so the two columns differ only in the weights.

The task says what a prompt and its reference are (`generation_rows`) and writes the replies in batches
(`generate_replies`); this module only scores and words them. A judge (eval.judge: a reward-model run, or the
user's function through usercode.py; the pipeline calls it) scores each reply too, and `judge` sums its scores up the
same way for either kind.
"""

from __future__ import annotations

import torch

from ..ops import textmetrics

HEADLINE = ("rougeL", "token_f1", "bleu", "exact_match")
TABLE_ROWS = 5  # prompts report.html shows base vs tuned


def generate(task, model, tokenizer, prompts: list[dict], info: dict, eval_cfg, seed: int, device,
             batch_size: int) -> list[dict]:
    """The replies of `model` to `prompts` (task.generation_rows' dicts), greedy or seeded sampling."""
    if not prompts:
        return []
    temperature = eval_cfg.temperature if eval_cfg.do_sample else 0.0
    # Sampling draws from a generator of its own, seeded by train.seed, so base and tuned replies are repeatable and
    # the training's random stream is left where it was.
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return task.generate_replies(model, tokenizer, [p["prompt"] for p in prompts], info,
                                     max_new_tokens=eval_cfg.max_new_tokens, temperature=temperature,
                                     top_p=eval_cfg.top_p, device=device, batch_size=batch_size)


def score(prompts: list[dict], replies: list[dict]) -> dict:
    """The figures of one split's replies against the references."""
    return textmetrics.reply_scores([r["reply"] for r in replies], [p["reference"] for p in prompts],
                                    [r["tokens"] for r in replies], [r["ended"] for r in replies])


def judge(scores: dict) -> dict:
    """Per split, from the judge's score of each base and tuned reply ({split: {"base": [...], "tuned": [...]}}):
    the mean of each, and the share of rows whose tuned reply scores above its base one (a tie counts half)."""
    out = {}
    for split, s in scores.items():
        base, tuned = s["base"], s["tuned"]
        wins = sum(1.0 if t > b else 0.5 if t == b else 0.0 for b, t in zip(base, tuned))
        out[split] = {"examples": len(tuned), "base_mean": sum(base) / len(base), "tuned_mean": sum(tuned) / len(tuned),
                      "win_rate": wins / len(tuned)}
    return out


def records(prompts: dict, base: dict, tuned: dict) -> dict:
    """generations.json: per split, each row's prompt, reference, base reply and tuned reply (with length and EOS)."""
    out = {}
    for split, rows in prompts.items():
        out[split] = []
        for i, p in enumerate(rows):
            row = dict(p)
            for side, replies in (("base", base), ("tuned", tuned)):
                if split in replies:
                    r = replies[split][i]
                    row.update({f"{side}_reply": r["reply"], f"{side}_tokens": r["tokens"], f"{side}_ended": r["ended"]})
                    if "judge" in r:
                        row[f"{side}_judge"] = r["judge"]
            out[split].append(row)
    return out


def describe(generation: dict) -> list[str]:
    """The console headline: one line per split, base -> tuned (or the tuned figures alone)."""
    lines = []
    tuned, base = generation.get("tuned", {}), generation.get("base", {})
    for split, after in tuned.items():
        if not after.get("examples"):
            continue
        before = base.get(split)
        parts = [_pair(m, before, after, "{:.2f}") for m in HEADLINE]
        parts.append(_pair("mean_length", before, after, "{:.1f}", "length"))
        parts.append(_pair("ended_with_eos", before, after, "{:.0%}", "ended with EOS"))
        rows = f"{after['examples']} row{'' if after['examples'] == 1 else 's'}"
        lines.append(f"generation ({split}, {rows}): {', '.join(parts)}")
        verdict = generation.get("judge", {}).get(split)
        if verdict:
            lines.append(f"judge ({split}): mean score {verdict['base_mean']:.3f} -> {verdict['tuned_mean']:.3f}, "
                         f"tuned wins {verdict['win_rate']:.0%}")
    return lines


def _pair(metric: str, before: dict | None, after: dict, fmt: str, name: str | None = None) -> str:
    label = name or metric.replace("_", " ")
    if before and before.get("examples"):
        return f"{label} {fmt.format(before[metric])} -> {fmt.format(after[metric])}"
    return f"{label} {fmt.format(after[metric])}"
