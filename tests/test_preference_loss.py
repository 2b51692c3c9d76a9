"""Preference losses pinned to TRL 1.16's own code paths.

TRL is a test-only dependency. Its trainers are not constructed (that needs datasets,
tokenizers and accelerate state); instead their loss methods are called unbound on a
minimal ``self`` carrying only the attributes they read, so the formulas under test
are TRL's, line for line.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import size, tol

from tunelab.ops.preference import (
    dpo_loss,
    dpo_metrics,
    reward_loss,
    reward_metrics,
    sequence_logps,
)

trl = pytest.importorskip("trl")
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.reward_trainer import RewardTrainer
from trl.trainer.utils import add_fused_lm_head, selective_log_softmax


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def _trl_self(model, **attrs):
    """The attributes DPOTrainer._compute_loss / RewardTrainer.compute_loss read from self."""
    base = {
        "model": model, "accelerator": _Accelerator(), "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "_total_train_tokens": 0, "_tp_size": 1, "aux_loss_enabled": False, "ld_alpha": None,
        "f_divergence_type": "reverse_kl", "use_weighting": False, "label_smoothing": 0.0, "loss_weights": [1.0],
        "precompute_ref_logps": True, "ref_model": None,
        "args": SimpleNamespace(gradient_checkpointing_kwargs=None, center_rewards_coefficient=None),
    }
    base.update(attrs)
    return SimpleNamespace(**base)


class _LogpsModel(torch.nn.Module):
    """Stands in for a fused-head model: per-token log-probs whose row sums are the given logps."""

    def __init__(self, per_token):
        super().__init__()
        self.per_token = per_token

    def forward(self, **kwargs):
        zeros = torch.zeros_like(self.per_token)
        return SimpleNamespace(log_probs=self.per_token, entropy=zeros, mean_logits=zeros,
                               is_top1=zeros.bool())


def _random_pairs(batch=6, seq=10, seed=0):
    """Seeded summed log-probs and completion masks in TRL's [chosen; rejected] layout."""
    g = torch.Generator().manual_seed(seed)
    logps = {k: -torch.rand(batch, generator=g, dtype=torch.float64).float() * 30 - 1
             for k in ("pc", "pr", "rc", "rr")}
    lengths = torch.randint(1, seq - 2, (2 * batch,), generator=g)
    completion_mask = torch.zeros(2 * batch, seq, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        completion_mask[i, 2:2 + n] = 1  # two prompt tokens, then the completion, then padding
    return logps, completion_mask, lengths


def _trl_dpo(logps, completion_mask, beta, loss_type, label_smoothing=0.0):
    """TRL 1.16's DPOTrainer._compute_loss on precomputed reference log-probs; (loss, logged metrics)."""
    per_token = torch.zeros(completion_mask.shape[0], completion_mask.shape[1] - 1)
    per_token[:, 0] = torch.cat([logps["pc"], logps["pr"]])  # TRL sums per_token over the sequence
    model = _LogpsModel(per_token).train()
    self = _trl_self(model, beta=beta, loss_types=[loss_type], label_smoothing=label_smoothing)
    inputs = {"input_ids": torch.ones_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": logps["rc"], "ref_rejected_logps": logps["rr"]}
    loss = DPOTrainer._compute_loss(self, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in self._metrics["train"].items()}


def _loss_tol(logps, losses, beta) -> float:
    """float32 rounding of DPO losses from the same log-probs in another order: h adds 4 log-probs and scales by
    beta (IPO divides by token counts and squares, doubling the loss's relative error); the loss's slope in h is
    at most 1; a mean adds up to 6 pairs: 16 roundings of terms up to beta x 4 x max |logp|, or the largest loss."""
    return tol(max(beta * 4 * size(logps), size(losses)), ops=16)


def _ours(logps, lengths, beta, loss_type, label_smoothing=0.0):
    n_chosen, n_rejected = lengths.chunk(2)
    return dpo_loss(logps["pc"], logps["pr"], logps["rc"], logps["rr"], beta=beta, label_smoothing=label_smoothing,
                    loss_type=loss_type, chosen_n_tokens=n_chosen, rejected_n_tokens=n_rejected)


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1), ("ipo", 1.0)])
def test_dpo_loss_and_metrics_match_trl(loss_type, beta):
    logps, completion_mask, lengths = _random_pairs(seed=1)
    losses, chosen_rewards, rejected_rewards = _ours(logps, lengths, beta, loss_type)
    trl_loss, trl_metrics = _trl_dpo(logps, completion_mask, beta, loss_type)
    assert losses.shape == (6,)
    atol = _loss_tol(logps, losses, beta)
    assert losses.mean().item() == pytest.approx(trl_loss.item(), abs=atol)
    # per pair too: TRL only returns the mean, so feed it one pair at a time
    for i in range(6):
        one = {k: v[i:i + 1] for k, v in logps.items()}
        rows = torch.tensor([i, 6 + i])
        assert losses[i].item() == pytest.approx(_trl_dpo(one, completion_mask[rows], beta, loss_type)[0].item(),
                                                 abs=atol)
    ours = dpo_metrics(chosen_rewards, rejected_rewards)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        # beta x (2 log-probs), a difference of two such, a mean over 6 pairs
        assert ours[name] == pytest.approx(trl_metrics[name], abs=tol(beta * 4 * size(logps), ops=3 + 6))
    assert 0.0 < ours["rewards/accuracies"] < 1.0  # the seeded batch has both outcomes


def test_cdpo_label_smoothing_matches_trl_weighted_logsigmoid():
    """TRL 1.16 dropped cDPO from 'sigmoid'; its 'aot' loss keeps the same weighted form, and with
    one pair per batch its sort is the identity, so it is TRL's own cDPO formula."""
    logps, completion_mask, lengths = _random_pairs(seed=2)
    beta, eps = 0.1, 0.1
    losses, _, _ = _ours(logps, lengths, beta, "sigmoid", label_smoothing=eps)
    plain, _, _ = _ours(logps, lengths, beta, "sigmoid")
    assert not torch.allclose(losses, plain)
    for i in range(6):
        one = {k: v[i:i + 1] for k, v in logps.items()}
        rows = torch.tensor([i, 6 + i])
        trl_loss, _ = _trl_dpo(one, completion_mask[rows], beta, "aot", label_smoothing=eps)
        assert losses[i].item() == pytest.approx(trl_loss.item(), abs=_loss_tol(logps, losses, beta))
    # Pin the divergence the docstring documents: TRL 1.16's sigmoid ignores label_smoothing.
    trl_smoothed, _ = _trl_dpo(logps, completion_mask, beta, "sigmoid", label_smoothing=eps)
    assert trl_smoothed.item() == pytest.approx(plain.mean().item(), abs=_loss_tol(logps, plain, beta))


def test_ipo_requires_token_counts():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="chosen_n_tokens"):
        dpo_loss(x, x, x, x, loss_type="ipo")
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, loss_type="hinge")


def _tiny_llama(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _pair_batch(pairs=3, seed=0):
    """[chosen; rejected] rows: a shared prompt, a completion, right padding (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    rows, masks = [], []
    prompts = [torch.randint(1, 64, (int(n),), generator=g) for n in torch.randint(2, 5, (pairs,), generator=g)]
    for side in range(2):
        for p in prompts:
            c = torch.randint(1, 64, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g)
            rows.append(torch.cat([p, c]))
            masks.append(torch.cat([torch.zeros_like(p), torch.ones_like(c)]))
    width = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    completion_mask = torch.zeros_like(input_ids)
    attention_mask = torch.zeros_like(input_ids)
    for i, (r, m) in enumerate(zip(rows, masks)):
        input_ids[i, :len(r)], completion_mask[i, :len(r)], attention_mask[i, :len(r)] = r, m, 1
    return input_ids, attention_mask, completion_mask


def test_sequence_logps_and_dpo_from_a_real_model_match_trl():
    policy, ref = _tiny_llama(0), _tiny_llama(1)
    input_ids, attention_mask, completion_mask = _pair_batch()
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    with torch.no_grad():
        logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits
        ref_logits = ref(input_ids=input_ids, attention_mask=attention_mask).logits
    sums, counts = sequence_logps(logits, labels)
    assert torch.equal(counts, completion_mask[:, 1:].sum(1))
    # float32, the n·eps bound: per token a log-softmax over the 64 words, of terms up to 2 max |logit| + log 64,
    # summed over a completion's tokens (TRL's fused head computes the 32-term logits again, too)
    tokens = int(counts.max())
    scale, ops = tokens * (2 * size(logits) + math.log(64)), 32 + 64 + tokens

    # TRL's log-softmax-and-gather helper
    trl_tokens = selective_log_softmax(logits[:, :-1], labels[:, 1:].clamp(min=0))
    trl_sums = (trl_tokens * (labels[:, 1:] != -100)).sum(1)
    torch.testing.assert_close(sums, trl_sums, atol=tol(scale, ops), rtol=0)

    # TRL's fused LM head, the path DPOTrainer actually scores sequences with
    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(ref)
    with torch.no_grad():
        fused = policy(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(sums, fused.log_probs.sum(1), atol=tol(scale, ops), rtol=0)

    # End to end: TRL's _compute_loss running both real models vs sequence_logps + dpo_loss
    ref_sums, _ = sequence_logps(ref_logits, labels)
    (pc, pr), (rc, rr), (nc, nr) = sums.chunk(2), ref_sums.chunk(2), counts.chunk(2)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    for loss_type in ("sigmoid", "ipo"):
        losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type, chosen_n_tokens=nc,
                                rejected_n_tokens=nr)
        self = _trl_self(policy, beta=0.1, loss_types=[loss_type], precompute_ref_logps=False, ref_model=ref)
        with torch.no_grad():
            trl_loss = DPOTrainer._compute_loss(self, policy, dict(inputs), return_outputs=False)
        # TRL scores the sequences again (beta x 4 sums' rounding), then the formula's own
        atol = 0.1 * 4 * tol(scale, ops) + _loss_tol([pc, pr, rc, rr], losses, 0.1)
        assert losses.mean().item() == pytest.approx(trl_loss.item(), abs=atol)


def test_sequence_logps_gradient_and_low_precision():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :3] = -100
    labels[1, :] = -100  # a row with nothing to score
    sums, counts = sequence_logps(logits, labels)
    expected = logits[0, 2:4].log_softmax(-1).gather(-1, labels[0, 3:5, None]).sum()
    assert counts.tolist() == [2, 0]
    # 2 tokens' log-softmaxes over 11 words, of terms up to 2 max |logit| + log 11
    atol = tol(2 * (2 * size(logits) + math.log(11)), ops=11 + 2)
    torch.testing.assert_close(sums, torch.stack([expected, torch.tensor(0.0)]), atol=atol, rtol=0)
    sums.sum().backward()
    assert logits.grad[0, 2:4].abs().sum() > 0 and logits.grad[1].abs().sum() == 0
    bf16_sums, _ = sequence_logps(logits.detach().bfloat16(), labels)
    assert bf16_sums.dtype == torch.float32
    # bf16 rounds each logit by half its ulp (eps_bf16 / 2 of its size), which moves a token's log-prob by at most
    # twice as much (|p - onehot| sums to 2): eps_bf16 x max |logit| for each of the 2 tokens
    torch.testing.assert_close(bf16_sums, sums.detach(), atol=tol(2 * size(logits), 1, torch.bfloat16), rtol=0)


class _ScoreModel(torch.nn.Module):
    def __init__(self, scores):
        super().__init__()
        self.scores = scores

    def forward(self, **kwargs):
        return SimpleNamespace(logits=self.scores[:, None])


@pytest.mark.parametrize("with_margin", [False, True])
def test_reward_loss_matches_trl(with_margin):
    g = torch.Generator().manual_seed(4)
    chosen, rejected = torch.randn(8, generator=g) * 3, torch.randn(8, generator=g) * 3
    model = _ScoreModel(torch.cat([chosen, rejected])).train()
    self = _trl_self(model)
    inputs = {"input_ids": torch.ones(16, 4, dtype=torch.long), "attention_mask": torch.ones(16, 4, dtype=torch.long)}
    margin = None
    if with_margin:
        margin = torch.rand(8, generator=g) * 2
        inputs["margin"] = margin
    trl_loss = RewardTrainer.compute_loss(self, model, inputs)
    losses = reward_loss(chosen, rejected, margin)
    assert losses.shape == (8,)
    # float32: chosen - rejected - margin (2 roundings, terms up to their sizes), a log-sigmoid of slope under 1,
    # a mean over 8 pairs
    scale = size(chosen) + size(rejected) + (size(margin) if with_margin else 0.0)
    assert losses.mean().item() == pytest.approx(trl_loss.item(), abs=tol(scale, ops=3 + 8))
    ours = reward_metrics(chosen, rejected)
    assert ours["accuracy"] == pytest.approx(self._metrics["train"]["accuracy"][-1], abs=tol(1.0, ops=8))
    assert ours["margin"] == pytest.approx(self._metrics["train"]["margin"][-1], abs=tol(scale, ops=1 + 8))


def test_equal_rewards_give_log2_and_more_chosen_logp_lowers_loss():
    g = torch.Generator().manual_seed(5)
    pc, pr = -torch.rand(4, generator=g) * 10, -torch.rand(4, generator=g) * 10
    # same log-ratio on both sides -> h = 0, up to float32 rounding of the log-probs (up to 10): 4 subtractions,
    # times beta 0.3 and the log-sigmoid's slope 1/2, and the loss's own few roundings of log 2
    atol = tol(10.0, ops=4)
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, pc - 1.5, pr - 1.5, beta=0.3)
    torch.testing.assert_close(losses, torch.full((4,), math.log(2)), atol=atol, rtol=0)
    torch.testing.assert_close(chosen_r, rejected_r, atol=atol, rtol=0)
    # with label smoothing the loss at h = 0 is still log 2
    smoothed, _, _ = dpo_loss(pc, pr, pc - 1.5, pr - 1.5, beta=0.3, label_smoothing=0.2)
    torch.testing.assert_close(smoothed, torch.full((4,), math.log(2)), atol=atol, rtol=0)

    ref_c, ref_r = pc - 0.5, pr + 0.5
    base, _, _ = dpo_loss(pc, pr, ref_c, ref_r)
    higher, _, _ = dpo_loss(pc + 1.0, pr, ref_c, ref_r)
    assert (higher < base).all()
    # and the gradient points that way: d loss / d chosen logp < 0, d loss / d rejected logp > 0
    pc_, pr_ = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    dpo_loss(pc_, pr_, ref_c, ref_r)[0].sum().backward()
    assert (pc_.grad < 0).all() and (pr_.grad > 0).all()
    # rewards are detached
    assert not dpo_loss(pc_, pr_, ref_c, ref_r)[1].requires_grad
    # IPO is minimised exactly at average log-ratio gap 1/(2β)
    n = torch.tensor([4, 4, 4, 4])
    at_target, _, _ = dpo_loss(torch.full((4,), 4 * 5.0), torch.zeros(4), torch.zeros(4), torch.zeros(4),
                               beta=0.1, loss_type="ipo", chosen_n_tokens=n, rejected_n_tokens=n)
    # (20 / 4 - 1 / (2 x 0.1))^2: the square of a few float32 roundings of 5
    torch.testing.assert_close(at_target, torch.zeros(4), atol=tol(5.0, ops=3) ** 2, rtol=0)


def test_metrics_on_hand_made_example():
    chosen = torch.tensor([1.0, 0.5, -1.0, 2.0])
    rejected = torch.tensor([0.0, 0.5, 0.0, -1.0])  # wins, tie (counts wrong), loses, wins
    m = dpo_metrics(chosen, rejected)
    assert m == pytest.approx({"rewards/chosen": 0.625, "rewards/rejected": -0.125,
                               "rewards/margins": 0.75, "rewards/accuracies": 0.5})
    r = reward_metrics(chosen, rejected)
    assert r == pytest.approx({"accuracy": 0.5, "margin": 0.75})
    # Bradley-Terry: a margin the chosen score does not clear costs more than none
    assert (reward_loss(chosen, rejected, margin=1.0) > reward_loss(chosen, rejected)).all()
    torch.testing.assert_close(reward_loss(torch.zeros(1), torch.zeros(1)), torch.tensor([math.log(2)]),
                               atol=tol(math.log(2), ops=2), rtol=0)  # -log sigmoid(0): a float32 log of 2
