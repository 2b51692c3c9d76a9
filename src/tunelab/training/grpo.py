"""Online RL against a reward (GRPO, Shao et al. 2024, as in TRL's GRPOTrainer): the RLHF step after sft.

Why GRPO rather than PPO: PPO needs a value model (a second network the size of the policy, or a value head
trained beside it) and GAE; GRPO replaces the value baseline with the mean reward of a *group* of completions of
the same prompt, so the whole state is the policy (and, for adapter methods, its adapter-disabled self as the
reference). On a 2-core CPU, and with small memory in general, that is the difference between fitting and not.

One step: take `prompts_per_step` prompts, sample `group_size` completions of each from the policy (temperature
`temperature`), score each completion with `reward_fn(prompts, completions) -> list[float]` (a Python function,
or a tunelab reward model's scores), standardise the rewards within each group (advantage
A = (r - mean_group) / (std_group + 1e-4)), and take one gradient step on

    loss = mean over completion tokens of [ -A * logp_policy(token) + beta * KL_k3(policy || reference) ]

where KL_k3 = exp(ref - pol) - (ref - pol) - 1 per token (Schulman's unbiased, always-positive estimator, TRL's
choice). One update per batch of samples (on-policy), so the PPO-style ratio is exactly 1 and needs no clipping.
The reference is the model with its adapters disabled (methods.adapters_disabled): no second copy in memory; for
full fine-tuning (no adapters) a frozen copy of the starting model.
"""

from __future__ import annotations

import copy
import random
import statistics
from collections.abc import Callable

import torch

from .. import methods
from ..evaluate import usercode


def completion_logps(model, prompt_ids: list[int], completion_ids: list[list[int]]) -> list[torch.Tensor]:
    """Per-token log-probabilities of each completion after the prompt (one padded forward)."""
    seqs = [prompt_ids + c for c in completion_ids]
    longest = max(len(s) for s in seqs)
    pad = 0
    ids = torch.full((len(seqs), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    out = []
    start = len(prompt_ids)
    for i, c in enumerate(completion_ids):
        # logits at position t predict token t + 1
        lp = logits[i, start - 1 : start - 1 + len(c)].log_softmax(-1)
        out.append(lp.gather(-1, torch.tensor(c, device=lp.device)[:, None])[:, 0])
    return out


@torch.no_grad()
def sample(model, tokenizer, prompt_texts: list[str], reward_fn: Callable, group_size: int, max_new_tokens: int,
           temperature: float, add_special_tokens: bool = False) -> tuple[list, list[float]]:
    """`group_size` sampled completions of each prompt and their rewards: ([(prompt ids, [completion ids])],
    rewards in prompt-major order). A completion runs up to and including its first EOS."""
    was_training = model.training
    model.eval()
    samples = []
    for text in prompt_texts:
        ids = tokenizer(text, add_special_tokens=add_special_tokens, return_tensors="pt")["input_ids"]
        ids = ids.to(next(model.parameters()).device)
        gen = model.generate(input_ids=ids.repeat(group_size, 1), attention_mask=torch.ones_like(ids).repeat(group_size, 1),
                             do_sample=True, temperature=temperature, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        completions = []
        for row in gen[:, ids.shape[1]:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id) + 1]
            completions.append(row or [tokenizer.eos_token_id])
        samples.append((ids[0].tolist(), completions))
    model.train(was_training)
    prompts_flat = [t for t, (_, cs) in zip(prompt_texts, samples) for _ in cs]
    texts_flat = [tokenizer.decode(c, skip_special_tokens=True) for _, cs in samples for c in cs]
    return samples, [float(r) for r in reward_fn(prompts_flat, texts_flat)]  # rl.train passes a `checked` reward


def score(reward_fn: Callable, prompts: list[str], completions: list[str], name: str, when: str) -> list[float]:
    """reward_fn(prompts, completions) as one float per completion, or a one-paragraph TunelabError naming the reward
    (`name`, e.g. "task.reward_function='rewards.py:score'") and what went wrong: it raised, returned the wrong
    number of values, or a value that is not a finite number. `when` says what it was scoring."""
    fix = (f"The reward is called as function(prompts, completions) with two lists of {len(completions)} strings and "
           f"must return {len(completions)} finite numbers, one per completion (a completion may be empty); fix it.")
    return usercode.numbers(lambda: reward_fn(list(prompts), list(completions)), prompts, completions,
                            f"The reward {name}", when, fix)


def checked(reward_fn: Callable, name: str) -> Callable:
    """reward_fn, its calls checked by `score`: what training and evaluation call, so a reward that fails in the
    middle of a run is one clear paragraph too."""
    return lambda prompts, completions: score(reward_fn, prompts, completions, name, "while scoring sampled completions")


def try_reward(reward_fn: Callable, name: str, prompts: list[str], own_texts: list[str]) -> None:
    """Call the reward once, before the run, on a few prompts with fixed completions (an empty one, and the prompt's
    own text): a reward that fails, returns the wrong number of values or a non-number is an error before anything
    is sampled or written. No model is needed."""
    completions = [c for text in own_texts for c in ("", text)]
    score(reward_fn, [p for p in prompts for _ in range(2)], completions, name,
          f"when tried before the run on {len(prompts)} training prompt(s) with fixed completions (an empty one and "
          f"the prompt's own text)")


def has_adapters(model) -> bool:
    return any(hasattr(m, "adapter_disabled") for m in model.modules()) or hasattr(model, "prompt_encoder")


def step(model, tokenizer, optimizer, prompt_texts: list[str], reward_fn: Callable, group_size: int = 4,
         max_new_tokens: int = 16, temperature: float = 1.0, beta: float = 0.04, max_grad_norm: float = 1.0,
         add_special_tokens: bool = False, reference=None) -> dict:
    """Sample, score, and take one policy-gradient step; returns the step's mean reward, KL and loss.
    `reference`: a frozen copy of the starting model (full fine-tuning); None = the model with adapters disabled."""
    samples, rewards = sample(model, tokenizer, prompt_texts, reward_fn, group_size, max_new_tokens, temperature,
                              add_special_tokens)

    model.train()
    optimizer.zero_grad(set_to_none=True)
    total_loss, total_kl, n_tokens = 0.0, 0.0, sum(len(c) for _, cs in samples for c in cs)
    for g, (prompt_ids, completions) in enumerate(samples):
        group = rewards[g * group_size : (g + 1) * group_size]
        mean, std = statistics.fmean(group), statistics.pstdev(group)
        advantages = [(r - mean) / (std + 1e-4) for r in group]
        policy = completion_logps(model, prompt_ids, completions)
        with torch.no_grad():
            if reference is not None:
                ref = completion_logps(reference, prompt_ids, completions)
            else:
                with methods.adapters_disabled(model):
                    ref = completion_logps(model, prompt_ids, completions)
        group_loss = 0.0
        for lp, rp, a in zip(policy, ref, advantages):
            kl = torch.exp(rp - lp) - (rp - lp) - 1
            group_loss = group_loss + (-a * lp + beta * kl).sum() / n_tokens  # token-level mean over the step
            total_kl += float(kl.detach().sum())
        group_loss.backward()  # one backward per group: its completions share one forward
        total_loss += float(group_loss.detach())
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    return {"reward": statistics.fmean(rewards), "kl": total_kl / max(n_tokens, 1), "loss": total_loss,
            "completion_tokens": n_tokens}


def train(model, tokenizer, prompt_texts: list[str], reward_fn: Callable, steps: int, lr: float = 1e-4,
          prompts_per_step: int = 2, seed: int = 0, log: Callable[[dict], None] | None = None, **step_kwargs) -> list[dict]:
    """`steps` GRPO steps over the prompts (seeded order); AdamW on the trainable parameters."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    # Adapter methods compare against their own base (no copy); a method that trains the base weights needs a
    # frozen copy of the starting model as the reference.
    reference = None if has_adapters(model) else copy.deepcopy(model).eval().requires_grad_(False)
    history = []
    order = []
    for i in range(steps):
        if len(order) < prompts_per_step:
            order += rng.sample(range(len(prompt_texts)), len(prompt_texts))
        batch, order = [prompt_texts[j] for j in order[:prompts_per_step]], order[prompts_per_step:]
        record = {"type": "train", "step": i + 1, **step(model, tokenizer, optimizer, batch, reward_fn, reference=reference,
                                                          **step_kwargs)}
        history.append(record)
        if log is not None:
            log(record)
    return history
