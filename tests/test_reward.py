"""The reward model (task.type reward): Bradley–Terry on preference pairs, scored at the last token; it learns
which of two replies is preferred, and its metrics are computed from the chosen/rejected scores."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import FORWARD_OPS, forward_ops, tol, write_jsonl

import tunelab
from tunelab.tasks import reward


def _pairs(n: int, seed: int = 0) -> list[dict]:
    """The preferred reply is the polite one: a rule a tiny model can learn from the reply's words."""
    rng = random.Random(seed)
    polite, rude = ["thanks", "please", "glad", "kind"], ["no", "go", "away", "never"]
    out = []
    for i in range(n):
        prompt = f"question {i} about " + " ".join(rng.sample(["cats", "rain", "tea", "maps", "code"], 2))
        out.append({"prompt": prompt, "chosen": " ".join(rng.sample(polite, 3)), "rejected": " ".join(rng.sample(rude, 3))})
    return out


def test_the_loss_is_bradley_terry_on_the_last_token_scores(tiny_chat_llama):

    from tunelab.config import ModelConfig

    info = {"task": "reward", "template": "auto", "truncation": "cut"}
    model, tok = reward.build_model(ModelConfig(path=str(tiny_chat_llama)), info)
    rows = [{**p, "prompt": [{"role": "user", "content": p["prompt"]}], "row": i} for i, p in enumerate(_pairs(4), 1)]
    feats, _ = reward.encode(rows, tok, info, 128)
    batch = reward.collate(feats, tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        scores = reward.forward(model, batch)
        # by hand: each side alone, its logit at its last token
        alone = [[model(input_ids=torch.tensor([f[f"{s}_ids"]])).logits[0, 0].item() for s in ("chosen", "rejected")]
                 for f in feats]
        # a forward pass of the tiny Llama over the batch's length, padded here, alone by hand
        score_tol = tol(alone, forward_ops(32, 64, 2, tokens=batch["input_ids"].shape[1]))
        torch.testing.assert_close(scores, torch.tensor(alone), atol=score_tol, rtol=0)
        expected = -F.logsigmoid(torch.tensor([a - b for a, b in alone])).sum()
        # 4 pairs, each from 2 scores through a log-sigmoid of slope under 1
        assert reward.loss(model, batch, info).item() == pytest.approx(expected.item(), abs=4 * 2 * score_tol)
    m = reward.metrics(torch.tensor([[2.0, 1.0], [0.0, 1.0], [3.0, -1.0]]), None, info)
    # float32 means over 3 pairs (of differences of scores up to 3)
    assert m["accuracy"] == pytest.approx(2 / 3, abs=tol(1.0, 3))
    assert m["margin"] == pytest.approx((1 - 1 + 4) / 3, abs=tol(4.0, 4))


def test_a_reward_model_learns_the_preference(tmp_path, tiny_chat_llama):
    train = write_jsonl(tmp_path / "train.jsonl", _pairs(120, seed=1))
    run = tunelab.train(None, [f"model.path={tiny_chat_llama}", f"data.train={train}", "task.type=reward",
                               "method.name=lora", "method.r=4", "train.lr=5e-3", "train.head_lr=5e-3",
                               "train.batch_size=8", "train.max_steps=40", "eval.samples=2", "data.max_length=64",
                               f"output_dir={tmp_path / 'rm'}"])
    s = run.summary
    assert s["eval"]["accuracy"] >= 0.9 and s["eval"]["margin"] > s["base"]["validation"]["margin"] + 0.5
    samples = json.loads((run.dir / "samples.json").read_text())
    assert all(x["score_chosen"] > x["score_rejected"] for x in samples["after"])


def test_predict_scores_replies_from_the_api_and_the_command_line(tmp_path, tiny_chat_llama, monkeypatch, capsys):
    import sys

    from tunelab import TunelabError, cli

    train = write_jsonl(tmp_path / "train.jsonl", _pairs(120, seed=1))
    run = tunelab.train(None, [f"model.path={tiny_chat_llama}", f"data.train={train}", "task.type=reward",
                               "method.name=lora", "method.r=4", "train.lr=5e-3", "train.head_lr=5e-3",
                               "train.batch_size=8", "train.max_steps=40", "eval.samples=0", "data.max_length=64",
                               f"output_dir={tmp_path / 'rm'}"])
    model = tunelab.load(run.dir)
    scored = model.predict([{"prompt": "question 1 about tea", "response": "thanks please kind"},
                            {"prompt": "question 1 about tea", "response": "no go away"}])
    assert scored[0]["score"] > scored[1]["score"]
    with pytest.raises(TunelabError, match="scores a reply to a prompt"):
        model.predict(["just a text"])
    monkeypatch.setattr(sys, "argv", ["tunelab", "predict", str(run.dir), "--prompt", "question 1 about tea",
                                      "--text", "thanks please kind", "--text", "no go away"])
    capsys.readouterr()
    cli.main()
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    score_tol = tol([s["score"] for s in scored], FORWARD_OPS)  # the same forward pass, batched as the command does
    assert [x["score"] for x in lines] == pytest.approx([s["score"] for s in scored], abs=score_tol)

    replies = write_jsonl(tmp_path / "replies.jsonl", [{"prompt": "question 1 about tea", "response": r}
                                                        for r in ("thanks please kind", "no go away")])
    monkeypatch.setattr(sys, "argv", ["tunelab", "predict", str(run.dir), str(replies)])
    cli.main()
    out = capsys.readouterr()
    assert [json.loads(x)["score"] for x in out.out.splitlines()] == pytest.approx([s["score"] for s in scored],
                                                                                    abs=score_tol)
    mean = sum(s["score"] for s in scored) / 2
    assert f"mean reward {mean:.4f} over 2 replies" in out.err
