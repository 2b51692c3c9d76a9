"""`tunelab export`: adapters as saved (peft layout where peft has one) and merged plain models."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import PROBS_TOL, make_rows, write_jsonl
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import tunelab
from tunelab import export, methods
from tunelab.errors import TunelabError

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
    # Merged weights against the run's own layers, up to rounding (qlora's merge adds to its dequantized base, which
    # is what its NF4 layers compute with)
    torch.testing.assert_close(_probs(out, TEXTS), expected, atol=PROBS_TOL, rtol=0)
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


def _tree(d: Path) -> dict:
    """Every file and link under `d`, byte for byte."""
    return {str(p.relative_to(d)): os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
            for p in sorted(d.rglob("*"))}


def test_a_failed_export_leaves_the_old_one_byte_for_byte(tiny_bert, tmp_path, monkeypatch):
    run = _run(tmp_path, tiny_bert, "lora")
    out = export.run(run.dir, tmp_path / "out" / "merged", merge=True)
    mark = json.loads((out / ".tunelab-export").read_text())  # every export says it is one, and of which run
    assert mark["kind"] == "export" and mark["run"] == str(run.dir.resolve()) and mark["tunelab"]
    before = _tree(out)

    def full_disk(trained, where):
        (where / "config.json").write_text("{half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "merged", full_disk)
    with pytest.raises(TunelabError, match="No space left.*Nothing was replaced"):
        export.run(run.dir, out, merge=True, overwrite=True)
    assert _tree(out) == before
    assert [p.name for p in out.parent.iterdir()] == ["merged"]  # and no staging folder is left beside it


def test_overwrite_replaces_only_an_export(tiny_bert, tmp_path):
    run = _run(tmp_path, tiny_bert, "lora")
    model = tmp_path / "some-model"
    shutil.copytree(tiny_bert, model)  # a model folder looks like an export, but is not one
    before = _tree(model)
    with pytest.raises(TunelabError, match="--overwrite refused.*not made by `tunelab export`"):
        export.run(run.dir, model, merge=True, overwrite=True)
    assert _tree(model) == before
    old = export.run(run.dir, tmp_path / "old")
    (old / ".tunelab-export").unlink()  # an export made before the marker: known by its tunelab_export.json
    assert export.run(run.dir, old, merge=True, overwrite=True) == old
    assert (old / ".tunelab-export").is_file() and (old / "config.json").is_file()
    assert not (old / "adapter_config.json").exists()


def test_out_may_not_be_or_hold_or_sit_in_the_run_or_its_base(tiny_bert, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_bert, base)
    run = _run(tmp_path, base, "lora")
    keep = {d: _tree(d) for d in (base, run.dir)}
    for out, where in ((base, "is the run's base model"), (base / "sub", "is inside the run's base model"),
                       (run.dir, "is the run folder"), (run.dir / "adapter", "is the run's adapter/"),
                       (run.dir / "exports" / "x", "is inside the run folder"), (tmp_path, "holds the run folder")):
        with pytest.raises(TunelabError, match=f"'{out}' {where}.*Choose a folder outside") as e:
            export.run(run.dir, out, merge=True, overwrite=True)
        assert "\n" not in str(e.value)
    assert {d: _tree(d) for d in keep} == keep


def test_links_in_the_artifact_are_copied_as_links_never_followed(tiny_bert, tmp_path):
    run = _run(tmp_path, tiny_bert, "lora")
    adapter = run.dir / "adapter"
    (adapter / "notes").mkdir()
    (adapter / "notes" / "readme.txt").write_text("about this adapter")
    os.symlink("notes/readme.txt", adapter / "README.txt")
    out = export.run(run.dir, tmp_path / "ok")
    assert (out / "README.txt").is_symlink() and os.readlink(out / "README.txt") == "notes/readme.txt"
    assert (out / "README.txt").read_text() == "about this adapter"  # points into the export, not the run
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    os.symlink(secret, adapter / "leak.txt")
    with pytest.raises(TunelabError, match="leak.txt' is a symbolic link.*never copies what they point to"):
        export.run(run.dir, tmp_path / "leak")
    assert not [p.name for p in tmp_path.iterdir() if "leak" in p.name]


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
    assert e.value.code == 2 and "--format must be one of peft, tunelab, sentence-transformers, gguf" in capsys.readouterr().err
