"""Generation with virtual-token methods (prompt tuning, P-tuning, prefix tuning) uses the KV cache and batches
prompts with left padding, and writes token for token what the model's full forwards pick one prompt at a time.

The reference is a greedy loop over full, uncached forwards of one unpadded prompt (what generation did before
the cache): the hooks add the virtual tokens to every such forward, so it needs no generation machinery."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import forward_ops, make_chat_rows, make_rows, tol

from tunelab import config, methods, models
from tunelab.config import PrefixConfig, PromptConfig, PTuningConfig
from tunelab.tasks import causal_lm

CHAT_INFO = {"task": "sft", "template": "chat", "train_on_prompt": False, "truncation": "cut"}
TEXT_INFO = {"task": "causal_lm", "template": "alpaca", "train_on_prompt": True, "truncation": "cut"}
NEW_TOKENS = 12
CONFIGS = {
    "prompt": PromptConfig(name="prompt", num_virtual_tokens=5),
    "ptuning": PTuningConfig(name="ptuning", num_virtual_tokens=5, encoder_hidden_size=16),
    "ptuning-lstm": PTuningConfig(name="ptuning", num_virtual_tokens=5, encoder="lstm", encoder_hidden_size=16),
    "prefix": PrefixConfig(name="prefix", num_virtual_tokens=5),
}


def _model(path, info, method: str):
    """The tiny causal LM with the method applied, its weights and virtual tokens shaken so that replies vary with
    the prompt, and EOS ruled out so that every reply runs to the limit."""
    cfg = config.validate({"model": {"path": str(path)}, "data": {"train": "x.jsonl"}, "task": {"type": info["task"]}})
    model, tok = causal_lm.build_model(cfg.model, dict(info))
    torch.manual_seed(3)
    methods.get(CONFIGS[method].name).apply(model, CONFIGS[method], [])
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    no_eos = torch.zeros(len(tok))
    no_eos[tok.eos_token_id] = -1e4
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: o + no_eos)
    return model.eval(), tok


def _prompts(tok, info) -> list[str]:
    """Seven prompts of different lengths (one shorter, one much longer), so that batches of four are left-padded."""
    if info["task"] == "causal_lm":
        texts = [r["text"] for r in make_rows(7, seed=5)]
        texts[3] = "the film was really quite moving and the cast was great but the ending was dull"
        return texts
    prompts = [p["prompt"] for p in causal_lm.generation_rows(make_chat_rows(7, seed=5), tok, info)]
    for i, question in ((0, "Opposite of up?"), (3, "What is the opposite of a very long word, hot, big and up?")):
        prompts[i] = causal_lm.prompt_text([{"role": "user", "content": question}], tok, info)
    return prompts


@torch.no_grad()
def _reference(model, tok, text: str, info) -> tuple[str, float, float]:
    """(greedy reply over full forwards of the one unpadded prompt, the smallest gap between the two best logits
    on the way, the largest |logit|)."""
    ids = tok(text, add_special_tokens=info["task"] == "causal_lm")["input_ids"]
    reply, gap, scale = [], float("inf"), 0.0
    for _ in range(NEW_TOKENS):
        x = torch.tensor([ids + reply])
        logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0, -1]
        best = logits.topk(2).values
        gap, scale = min(gap, float(best[0] - best[1])), max(scale, float(best[0].abs()))
        reply.append(int(logits.argmax()))
    return tok.decode(reply, skip_special_tokens=True).strip(), gap, scale


def _body_calls(model) -> tuple[list[int], object]:
    """The number of new tokens of every call of the model's body (a hook; remove it with the handle returned)."""
    lengths: list[int] = []

    def record(module, args, kwargs):
        x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        lengths.append((x if x is not None else args[0]).shape[1])

    _, body = models.body_of(model)
    return lengths, body.register_forward_pre_hook(record, with_kwargs=True, prepend=True)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_cached_batched_generation_equals_full_forwards_one_prompt_at_a_time(arch, method, request):
    path, info = (request.getfixturevalue("tiny_chat_llama"), CHAT_INFO) if arch == "llama" else \
        (request.getfixturevalue("tiny_gpt2"), TEXT_INFO)
    model, tok = _model(path, info, method)
    prompts = _prompts(tok, info)
    reference = [_reference(model, tok, p, info) for p in prompts]
    # A greedy pick that float rounding could flip (another batch layout, the cache) would make equality luck. The
    # roundings of a forward pass add up like a random walk (sqrt(n)·eps), and both ways round: keep 4 times clear.
    gap, scale = min(r[1] for r in reference), max(r[2] for r in reference)
    assert gap > 4 * tol(scale, math.sqrt(forward_ops(32, 128, 2, tokens=64)))
    expected = [r[0] for r in reference]
    assert len(set(expected)) == len(expected) and all(expected)  # replies that depend on the prompt

    lengths, handle = _body_calls(model)
    batched = causal_lm.generate_replies(model, tok, prompts, info, max_new_tokens=NEW_TOKENS, batch_size=4)
    handle.remove()
    assert [r["reply"] for r in batched] == expected
    assert [r["tokens"] for r in batched] == [NEW_TOKENS] * len(prompts)
    # Two batches (the 4 shortest prompts, then 3), each one prefill then one token a call from the cache.
    assert len(lengths) == 2 * NEW_TOKENS and lengths.count(1) == 2 * (NEW_TOKENS - 1)
    widths = sorted(len(tok(p, add_special_tokens=info["task"] == "causal_lm")["input_ids"]) for p in prompts)
    assert [lengths[0], lengths[NEW_TOKENS]] == [widths[3], widths[6]] and widths[0] < widths[3] < widths[6]

    lengths, handle = _body_calls(model)
    assert causal_lm.generate(model, tok, prompts[:3], info, max_new_tokens=NEW_TOKENS) == expected[:3]
    handle.remove()
    assert lengths.count(1) == 3 * (NEW_TOKENS - 1)  # the streaming path uses the cache too

    # transformers' generate without the cache (a user's call) hands each full forward the last one's cache back.
    ids = torch.tensor([tok(prompts[0], add_special_tokens=info["task"] == "causal_lm")["input_ids"]])
    with torch.no_grad():
        uncached = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                  do_sample=False, use_cache=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(uncached[0, ids.shape[1]:], skip_special_tokens=True).strip() == expected[0]


def test_disabled_virtual_tokens_generate_what_the_base_does(tiny_chat_llama):
    """With the adapter disabled, the cached, batched path is the base model's (the hooks step aside at every call)."""
    model, tok = _model(tiny_chat_llama, CHAT_INFO, "prompt")
    prompts = _prompts(tok, CHAT_INFO)
    with methods.adapters_disabled(model):
        expected = [_reference(model, tok, p, CHAT_INFO)[0] for p in prompts]
        batched = causal_lm.generate_replies(model, tok, prompts, CHAT_INFO, max_new_tokens=NEW_TOKENS, batch_size=4)
    assert [r["reply"] for r in batched] == expected
    assert expected != [r["reply"] for r in causal_lm.generate_replies(model, tok, prompts, CHAT_INFO,
                                                                       max_new_tokens=NEW_TOKENS, batch_size=4)]
