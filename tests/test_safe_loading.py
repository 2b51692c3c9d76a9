"""Weights load only from safetensors unless the user says the pickle files are trusted."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
from conftest import make_rows, write_jsonl
from transformers import AutoModel

import tunelab
from tunelab import cli

QUIET = ["eval.base=false", "eval.linear_probe=false", "eval.samples=0", "eval.forgetting=none", "train.max_steps=1",
         "method.name=lora"]


@pytest.fixture(scope="module")
def pickled_bert(tiny_bert, tmp_path_factory):
    """tiny_bert with its weights as pytorch_model.bin (pickle) and no safetensors."""
    path = tmp_path_factory.mktemp("models") / "pickled-bert"
    shutil.copytree(tiny_bert, path)
    (path / "model.safetensors").unlink()
    torch.save(AutoModel.from_pretrained(tiny_bert).state_dict(), path / "pytorch_model.bin")  # as older hubs ship
    assert (path / "pytorch_model.bin").is_file() and not list(path.glob("*.safetensors"))
    return path


def test_pickle_weights_are_refused_with_the_way_out(pickled_bert, tmp_path, monkeypatch, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(40, seed=1))
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["tunelab", "train", str(tmp_path / "r.yaml"), f"model.path={pickled_bert}",
                                      f"data.train={train}", f"output_dir={out}", *QUIET])
    (tmp_path / "r.yaml").write_text("{}\n")
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err.replace("\n", " ")
    assert e.value.code == 2 and "Traceback" not in err
    assert "pytorch_model.bin" in err and "can run arbitrary code" in err and "--allow-pickle" in err
    assert not out.exists()

    monkeypatch.setattr(sys, "argv", sys.argv + ["--allow-pickle"])
    try:
        cli.main()
    except SystemExit as e:  # success may return or exit 0
        assert e.code in (0, None), capsys.readouterr().err[-2000:]
    assert (out / "summary.json").is_file()
    cfg = (out / "config.yaml").read_text()
    assert "allow_pickle: true" in cfg  # the run records that it trusted pickle files
    # ... but a run folder (perhaps someone else's) never turns pickles on by itself: loading it back needs the flag
    with pytest.raises(tunelab.TunelabError, match="pytorch_model.bin.*--allow-pickle"):
        tunelab.load(out)
    tunelab.load(out, allow_pickle=True)
