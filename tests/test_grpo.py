"""GRPO (online RL against a reward): sampled groups, group-standardised advantages, a KL penalty to the
adapter-disabled reference; on a tiny model with a simple reward the mean reward rises over 50 steps."""

from __future__ import annotations

import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab import methods
from tunelab.config import FullConfig, LoraConfig
from tunelab.training import grpo


def _share_of_o(prompts, completions):
    """Reward: the share of the letter 'o' among the completion's letters (a preference for a given token)."""
    return [c.count("o") / max(sum(ch.isalpha() for ch in c), 1) for c in completions]


def test_the_mean_reward_rises_over_50_steps(tiny_chat_llama):
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_chat_llama)
    model = methods.prepare(AutoModelForCausalLM.from_pretrained(tiny_chat_llama), FullConfig(name="full"), [])
    prompts = [f"<|im_start|>user\nsay word {i}<|im_end|>\n<|im_start|>assistant\n" for i in range(8)]
    history = grpo.train(model, tok, prompts, _share_of_o, steps=50, lr=1e-2, prompts_per_step=2, group_size=8,
                         max_new_tokens=12, beta=0.04, seed=0)
    first, last = (statistics.fmean(h["reward"] for h in part) for part in (history[:10], history[-10:]))
    print(f"mean reward: first 10 steps {first:.3f}, last 10 steps {last:.3f}")
    assert last > first + 0.1
    # full fine-tuning compares against a frozen copy of the starting model: the KL grows from 0
    assert history[0]["kl"] == pytest.approx(0, abs=1e-6) and history[-1]["kl"] > 1e-3


def test_adapters_use_their_own_base_as_the_reference(tiny_chat_llama):
    tok = AutoTokenizer.from_pretrained(tiny_chat_llama)
    model = methods.prepare(AutoModelForCausalLM.from_pretrained(tiny_chat_llama), LoraConfig(name="lora", r=4), [])
    assert grpo.has_adapters(model)
    history = grpo.train(model, tok, ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"], _share_of_o,
                         steps=3, lr=1e-2, prompts_per_step=1, group_size=4, max_new_tokens=6, seed=0)
    assert history[0]["kl"] == pytest.approx(0, abs=1e-6) and history[-1]["kl"] > 0  # B starts at 0: policy == base


def test_completion_logps_match_a_plain_forward(tiny_chat_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_llama).eval()
    prompt, completions = [5, 9, 13], [[20, 21, 22], [30]]
    with torch.no_grad():
        got = grpo.completion_logps(model, prompt, completions)
        for c, lp in zip(completions, got):
            logits = model(input_ids=torch.tensor([prompt + c])).logits[0].log_softmax(-1)
            expected = torch.stack([logits[len(prompt) - 1 + i, t] for i, t in enumerate(c)])
            torch.testing.assert_close(lp, expected, atol=1e-5, rtol=0)
