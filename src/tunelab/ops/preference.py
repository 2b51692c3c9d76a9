"""Preference-tuning objectives (DPO, IPO, reward modelling) as plain tensor functions.

Each function takes per-sequence log-probabilities or scores and returns per-pair
values, so a training loop can reduce (mean, weight, gather) as it needs. The
formulas are pinned to TRL 1.16 (``DPOTrainer._compute_loss`` and
``RewardTrainer.compute_loss``) by ``tests/test_preference_loss.py``; where this
module deliberately differs from TRL 1.16 (cDPO label smoothing) the docstring says so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Rows of the (tokens, vocab) block normalised at once: bounds the float32 copy
# to chunk * vocab instead of every completion token of the batch.
_CHUNK = 4096


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of the label tokens' log-probabilities, and how many tokens were summed.

    The reference definition, pinned to TRL in the tests; training computes the same sums without the batch's
    logits (tasks/dpo._logps over ops/lm_loss), tested equal to this.

    Args:
        logits: ``(batch, seq, vocab)`` from a causal LM, any float dtype.
        labels: ``(batch, seq)`` token ids, ``-100`` where a position is not scored
            (prompt, padding). Shifted as in HF causal LMs: ``logits[:, t]`` predicts
            ``labels[:, t + 1]``, so ``labels[:, 0]`` is never scored.

    Returns:
        ``(sum_logps, n_tokens)``: float32 ``(batch,)`` with gradient to ``logits``, and
        long ``(batch,)``. A row with no scored token gets 0.0 and 0.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    # Only scored positions are normalised: the prompt usually dominates the sequence.
    picked_logits = logits[:, :-1][keep]
    picked_targets = targets[keep]
    parts = []
    for start in range(0, picked_targets.shape[0], _CHUNK):
        rows = picked_logits[start:start + _CHUNK].float()
        # log_softmax(x)_y = x_y - logsumexp(x); avoids writing the full log_softmax tensor.
        label_logit = rows.gather(-1, picked_targets[start:start + _CHUNK, None]).squeeze(-1)
        parts.append(label_logit - torch.logsumexp(rows, dim=-1))
    token_logps = torch.cat(parts) if parts else picked_logits.new_zeros(0, dtype=torch.float32)
    per_position = torch.zeros(keep.shape, dtype=torch.float32, device=logits.device)
    per_position = per_position.masked_scatter(keep, token_logps)
    return per_position.sum(dim=1), keep.sum(dim=1)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    chosen_n_tokens: torch.Tensor | None = None,
    rejected_n_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO-family loss and the implicit rewards.

    All log-prob inputs are ``(batch,)`` sums over completion tokens (``sequence_logps``).
    With ``h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)``:

    - ``"sigmoid"`` (DPO, Rafailov et al. 2023):
      ``-(1 - ε) logσ(βh) - ε logσ(-βh)`` with ``ε = label_smoothing``.
      ``ε > 0`` is conservative DPO (cDPO, Mitchell 2023): the preference label is assumed
      flipped with probability ε. NOTE: TRL <= 0.x applied this in its ``sigmoid`` loss, but
      TRL 1.16's ``sigmoid`` ignores ``label_smoothing`` (it only feeds ``robust``, ``exo_pair``
      and ``aot``); the two agree at the default ``ε = 0``.
    - ``"ipo"`` (IPO, Azar et al. 2023): ``(h̄ - 1/(2β))²`` where, as in TRL 1.16, ``h̄``
      uses log-ratios *averaged per completion token*:
      ``h̄ = (policy_chosen - ref_chosen) / n_chosen - (policy_rejected - ref_rejected) / n_rejected``.
      So ``chosen_n_tokens`` / ``rejected_n_tokens`` (the counts from ``sequence_logps``) are
      required; counts are clamped to >= 1 as TRL does. β is IPO's τ. ``label_smoothing`` unused.

    Rewards are ``β * (policy - ref)`` on the *summed* log-probs, detached, for every loss
    type (TRL logs the same summed rewards under IPO too).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(batch,)``; reduce ``losses``
        with ``.mean()`` to get TRL's scalar loss.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps

    if loss_type == "sigmoid":
        h = chosen_logratios - rejected_logratios
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h)
        if label_smoothing:
            losses = losses - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        if chosen_n_tokens is None or rejected_n_tokens is None:
            raise ValueError(
                "loss_type='ipo' averages log-ratios per completion token (as TRL does): pass "
                "chosen_n_tokens and rejected_n_tokens, the counts returned by sequence_logps."
            )
        chosen_avg = chosen_logratios / chosen_n_tokens.to(chosen_logratios.dtype).clamp(min=1.0)
        rejected_avg = rejected_logratios / rejected_n_tokens.to(rejected_logratios.dtype).clamp(min=1.0)
        losses = (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"Unknown DPO loss_type {loss_type!r}; expected 'sigmoid' or 'ipo'.")

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def dpo_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """Batch means of the implicit rewards, under the names TRL's DPOTrainer logs.

    ``rewards/margins`` is the mean of ``chosen - rejected``; ``rewards/accuracies`` the
    fraction of pairs with ``chosen > rejected`` (a tie counts as wrong, as in TRL).
    """
    chosen_rewards = chosen_rewards.detach().float()
    rejected_rewards = rejected_rewards.detach().float()
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
    }


def reward_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Per-pair Bradley–Terry loss ``-logσ(chosen - rejected - margin)``, as TRL's RewardTrainer.

    ``margin`` (per pair or scalar) asks the chosen score to win by at least that much
    (Llama 2's graded preferences). TRL's optional ``center_rewards_coefficient`` term is
    not included: add ``coef * ((chosen + rejected) ** 2).mean()`` in the caller if wanted.
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def reward_metrics(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> dict[str, float]:
    """``accuracy`` (fraction with chosen > rejected, ties wrong) and mean ``margin``, TRL's names."""
    chosen_scores = chosen_scores.detach().float()
    rejected_scores = rejected_scores.detach().float()
    return {
        "accuracy": (chosen_scores > rejected_scores).float().mean().item(),
        "margin": (chosen_scores - rejected_scores).mean().item(),
    }
