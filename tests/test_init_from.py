"""`method.init_from`: start from a saved adapter (tunelab's or peft's) and keep training it."""

from __future__ import annotations

import pytest
import torch
from conftest import FORWARD_OPS, make_rows, tol, write_jsonl
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import tunelab
from tunelab import config, methods, models
from tunelab.errors import TunelabError
from tunelab.tasks import classification as task

peft = pytest.importorskip("peft")
INFO = {"labels": ["neg", "pos"]}
TEXTS = ["great film", "a dull and tedious plot", "the cast was charming"]


def _prepared(model_path, method: dict):
    cfg = config.validate({"model": {"path": str(model_path)}, "data": {"train": "x.jsonl"}, "method": method})
    model, tok = task.build_model(cfg.model, INFO)
    model = methods.prepare(model, cfg.method, models.head_modules(model)).eval()
    with torch.no_grad():
        return model, task.forward(model, tok(TEXTS, padding=True, return_tensors="pt"))


@pytest.mark.parametrize("peft_cfg", [
    lambda: peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"]),
    lambda: peft.IA3Config(task_type="SEQ_CLS"),
    lambda: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4),
], ids=["lora", "ia3", "prompt"])
def test_starts_from_a_peft_adapter_with_peft_outputs(peft_cfg, tiny_bert, tmp_path):
    cfg = peft_cfg()
    torch.manual_seed(3)
    model = peft.get_peft_model(AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2), cfg)
    with torch.no_grad():  # move every adapter weight off its init so the check means something
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "peft")
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    with torch.no_grad():
        expected = model.eval()(**tok(TEXTS, padding=True, return_tensors="pt")).logits
    name = {"LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt"}[cfg.peft_type.value]
    ours, logits = _prepared(tiny_bert, {"name": name, "init_from": str(tmp_path / "peft")})
    torch.testing.assert_close(logits, expected, atol=tol(expected, FORWARD_OPS), rtol=0)
    assert any(p.requires_grad for n, p in ours.named_parameters() if not n.startswith(("classifier", "bert.pooler")))


def test_training_continues_from_a_tunelab_run(tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(80, seed=9))
    common = [f"model.path={tiny_bert}", f"data.train={train}", "train.max_steps=3", "train.lr=5e-3", "eval.linear_probe=false"]
    first = tunelab.train(None, [*common, "method.name=lora", "method.r=4", f"output_dir={tmp_path / 'a'}"])
    _, start = _prepared(tiny_bert, {"name": "lora", "init_from": str(first.dir / "adapter")})
    with torch.no_grad():
        ref = tunelab.load(first.dir)
        expected = task.forward(ref.model, ref.tokenizer(TEXTS, padding=True, return_tensors="pt"))
    torch.testing.assert_close(start, expected, atol=tol(expected, FORWARD_OPS), rtol=0)

    second = tunelab.train(None, [*common, "method.name=lora", f"method.init_from={first.dir / 'adapter'}",
                                  f"output_dir={tmp_path / 'b'}"])
    a, b = load_file(first.dir / "adapter/adapter_model.safetensors"), load_file(second.dir / "adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a if "lora_" in k)  # it kept training
    assert tunelab.config.load(second.dir / "config.yaml").method.init_from == str((first.dir / "adapter").resolve())


def test_init_from_a_missing_dir_is_a_clear_error(tiny_bert, tmp_path):
    with pytest.raises(TunelabError, match="adapter_config.json"):
        _prepared(tiny_bert, {"name": "lora", "init_from": str(tmp_path / "nothing")})
