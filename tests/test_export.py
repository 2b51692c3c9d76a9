"""`tunelab export`: adapters as saved (peft layout where peft has one) and merged plain models."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import tunelab
from tunelab import export, methods
from tunelab.errors import TunelabError
from conftest import make_rows, write_jsonl

TEXTS = ["great film and a charming cast", "a dull , tedious plot", "the ending was weak"]


def _run(tmp_path, model_path, method, *extra):
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(80, seed=6))
    return tunelab.train(None, [f"model.path={model_path}", f"data.train={train}", f"method.name={method}", *extra,
                               "train.max_steps=4", "train.lr=5e-3", "eval.linear_probe=false",
                               f"output_dir={tmp_path / method}"])


def _probs(model_dir, texts):
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        return model(**tok(texts, padding=True, return_tensors="pt")).logits.softmax(-1)


@pytest.mark.parametrize("method", sorted(m for m in methods.METHODS if m not in ("adapter", "prefix", "prompt", "ptuning")))
def test_merged_export_loads_with_transformers_alone(method, tiny_bert, tmp_path):
    run = _run(tmp_path, tiny_bert, method)
    out = export.run(run.dir, tmp_path / "merged", merge=True)
    ours = tunelab.load(run.dir).predict(TEXTS)
    expected = torch.tensor([[p["probs"]["neg"], p["probs"]["pos"]] for p in ours])
    tol = 2e-2 if method == "qlora" else 1e-5  # qlora merges a dequantized base
    torch.testing.assert_close(_probs(out, TEXTS), expected, atol=tol, rtol=0)
    info = json.loads((out / "tunelab_export.json").read_text())
    assert info["merged"] is True and info["labels"] == ["neg", "pos"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["id2label"] == {"0": "neg", "1": "pos"}


def test_adapter_export_is_the_peft_layout(tiny_bert, tmp_path):
    run = _run(tmp_path, tiny_bert, "lora", "method.r=4")
    out = export.run(run.dir, tmp_path / "exported")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 16 and cfg["target_modules"]
    assert (out / "adapter_model.safetensors").is_file()


def test_methods_without_peft_format_or_merge_say_so(tiny_bert, tmp_path):
    run = _run(tmp_path, tiny_bert, "adapter")
    with pytest.raises(TunelabError, match="no Hugging Face peft format.*--format tunelab"):
        export.run(run.dir, tmp_path / "a")
    assert (export.run(run.dir, tmp_path / "b", fmt="tunelab") / "tunelab_adapter.json").is_file()
    with pytest.raises(TunelabError, match="cannot be merged"):
        export.run(run.dir, tmp_path / "c", merge=True)


def test_export_never_overwrites_silently(tiny_bert, tmp_path):
    run = _run(tmp_path, tiny_bert, "lora")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(TunelabError, match="--overwrite"):
        export.run(run.dir, mine)
    with pytest.raises(TunelabError, match="refused"):
        export.run(run.dir, mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"
    out = export.run(run.dir, tmp_path / "e")
    assert export.run(run.dir, out, overwrite=True) == out


def test_export_command(tiny_bert, tmp_path, monkeypatch, capsys):
    from tunelab import cli

    run = _run(tmp_path, tiny_bert, "lora")
    monkeypatch.setattr("sys.argv", ["tunelab", "export", str(run.dir), str(tmp_path / "m"), "--merge"])
    cli.main()
    assert "exported" in capsys.readouterr().out
    assert (tmp_path / "m" / "config.json").is_file()
    monkeypatch.setattr("sys.argv", ["tunelab", "export", str(run.dir), str(tmp_path / "x"), "--format", "onnx"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2 and "--format must be peft, tunelab or sentence-transformers" in capsys.readouterr().err
