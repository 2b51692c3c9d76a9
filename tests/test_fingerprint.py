"""`--resume` checks that the run is what its checkpoint was made from: config.yaml, the data files, the model."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_rows, write_jsonl
from safetensors.torch import load_file
from test_resume import _crashed_copy, _overrides

import tunelab
from tunelab import cli, config
from tunelab.errors import TunelabError
from tunelab.training import checkpoint, fingerprint


@pytest.fixture
def train_file(tmp_path) -> Path:
    (tmp_path / "data").mkdir()
    return write_jsonl(tmp_path / "data" / "train.jsonl", make_rows(120, seed=0))


@pytest.fixture
def runs(tiny_bert, train_file, tmp_path):
    """(a LoRA run of 4 steps, a copy of it as it was when it stopped after checkpointing step 3)."""
    whole = tunelab.train(None, _overrides(tiny_bert, train_file, "lora", max_steps=4)
                          + [f"output_dir={tmp_path / 'whole'}"])
    return whole, _crashed_copy(whole.dir, tmp_path / "stopped", 3)


def _edit(run_dir: Path, **changes) -> None:
    """Edit the run's config.yaml as a user would: `train__batch_size=8` sets train.batch_size."""
    tree = yaml.safe_load((run_dir / "config.yaml").read_text())
    for key, value in changes.items():
        node = tree
        *parents, last = key.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    (run_dir / "config.yaml").write_text(yaml.safe_dump(tree))


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    artifact = run_dir / json.loads((run_dir / "summary.json").read_text())["artifact"]
    return {k: v for f in sorted(artifact.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _refusal(run_dir: Path) -> str:
    with pytest.raises(TunelabError) as e:
        tunelab.resume(run_dir)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"--resume {run_dir}: the run changed since its checkpoint "
                                                      f"step-0000003 was written: ")
    assert "pass --resume-anyway to go on with them" in message
    return message


def test_a_changed_setting_is_refused_naming_the_key_and_both_values_unless_anyway(runs, capsys):
    _, stopped = runs
    _edit(stopped, train__batch_size=8)
    assert "train.batch_size: 4 -> 8." in _refusal(stopped)
    capsys.readouterr()
    resumed = tunelab.resume(stopped, anyway=True)
    out = capsys.readouterr().out
    assert "--resume-anyway: going on from step-0000003 although the run changed since: train.batch_size: 4 -> 8" in out
    assert resumed.summary["steps"] == 4
    # the checkpoints written after it record the run as it is now: a later resume compares with that
    state = json.loads((resumed.dir / checkpoint.DIR / "step-0000004" / "state.json").read_text())
    assert state["fingerprint"]["config"]["train.batch_size"] == 8


def test_resume_anyway_goes_on_with_the_edited_learning_rate(runs):
    """The NaN guard's advice: lower train.lr in config.yaml and resume (anyway). The new LR takes over from there."""
    whole, stopped = runs
    lr = yaml.safe_load((stopped / "config.yaml").read_text())["train"]["lr"]
    _edit(stopped, train__lr=lr / 10)
    resumed = tunelab.resume(stopped, anyway=True)
    lrs = lambda run_dir: {r["step"]: r["lr"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text()
                                                           .splitlines()) if r["type"] == "train"}
    before, after = lrs(whole.dir), lrs(resumed.dir)
    assert after[3] == before[3] and after[4] == pytest.approx(before[4] / 10, rel=1e-12) and before[4] > 0


def test_a_changed_data_file_is_named(runs, train_file):
    _, stopped = runs
    before = train_file.stat().st_size
    with open(train_file, "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "a wonderful film", "label": "pos"}) + "\n")
    message = _refusal(stopped)
    assert f"data.train: '{train_file.resolve()}' changed ({before:,} bytes, sha256 " in message
    assert f"-> {train_file.stat().st_size:,} bytes, sha256 " in message


def test_a_changed_method_size_is_refused_and_anyway_cannot_load_it(runs):
    _, stopped = runs
    _edit(stopped, method__r=8)
    assert "method.r: 4 -> 8." in _refusal(stopped)
    with pytest.raises(TunelabError, match=r"checkpoint .*step-0000003 does not fit the model as config.yaml now "
                                           r"builds it: .*lora.* is \[4, 32\] in it and \[8, 32\] in the model.*"
                                           r"even with --resume-anyway"):
        tunelab.resume(stopped, anyway=True)


def test_another_model_or_changed_weights_are_named(runs, tiny_bert, tmp_path):
    _, stopped = runs
    other = shutil.copytree(tiny_bert, tmp_path / "other-model")
    original = (other / "config.json").read_text()
    (other / "config.json").write_text(json.dumps({**json.loads(original), "hidden_dropout_prob": 0.3}))
    _edit(stopped, model__path=str(other))
    message = _refusal(stopped)
    assert f'model.path: "{tiny_bert.resolve()}" -> "{other}", which holds other contents: config.json changed (' \
        in message

    (other / "config.json").write_text(original)
    weights = other / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the same size, another number
    weights.write_bytes(bytes(data))
    message = _refusal(stopped)
    assert "which holds other contents: model.safetensors changed (" in message and "config.json" not in message


def test_what_cannot_change_the_run_is_not_a_change(runs, train_file, tmp_path, capsys):
    """Settings in fingerprint.IGNORED, and a data file moved and named anew, resume as if untouched, to the weights
    of the run never stopped."""
    whole, stopped = runs
    moved = shutil.copy(train_file, tmp_path / "moved.jsonl")
    train_file.unlink()
    _edit(stopped, eval__samples=2, eval__max_new_tokens=5, train__keep_checkpoints=5, train__log_every=3,
          train__max_bad_steps=9, output_dir=str(tmp_path / "elsewhere"), data__train=str(moved))
    capsys.readouterr()
    resumed = tunelab.resume(stopped)
    assert "changed" not in capsys.readouterr().out
    a, b = _weights(whole.dir), _weights(resumed.dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_from_before_fingerprints_resumes_with_a_note(runs, capsys):
    _, stopped = runs
    path = stopped / checkpoint.DIR / "step-0000003"
    state = json.loads((path / "state.json").read_text())
    del state["fingerprint"]
    (path / "state.json").write_text(json.dumps(state))
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    manifest["files"]["state.json"] = {"bytes": (path / "state.json").stat().st_size,
                                       "sha256": fingerprint.sha256(path / "state.json")}
    (path / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    _edit(stopped, train__batch_size=8)  # cannot be seen
    capsys.readouterr()
    assert tunelab.resume(stopped).summary["steps"] == 4
    assert "note: checkpoint step-0000003 was written before tunelab recorded what a run is made of" in \
        capsys.readouterr().out


def test_cli_refuses_a_changed_run_and_goes_on_with_resume_anyway(runs, monkeypatch, capsys):
    _, stopped = runs
    lr = yaml.safe_load((stopped / "config.yaml").read_text())["train"]["lr"]
    _edit(stopped, train__lr=lr * 10)
    monkeypatch.setattr(sys, "argv", ["tunelab", "train", "--resume", str(stopped)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    captured = capsys.readouterr()
    err = captured.err.replace("\n", " ")
    assert e.value.code == 2 and "Traceback" not in captured.err
    assert f"error: --resume {stopped}: the run changed" in err
    assert f"train.lr: {json.dumps(lr)} -> {json.dumps(lr * 10)}" in err
    monkeypatch.setattr(sys, "argv", ["tunelab", "train", "--resume", str(stopped), "--resume-anyway"])
    cli.main()
    assert f"run directory: {stopped.resolve()}" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["tunelab", "train", "recipe.yaml", "--resume-anyway"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err.replace("\n", " ")
    assert e.value.code == 2 and "--resume-anyway goes with --resume RUN_DIR" in err


def test_the_fingerprint_leaves_out_what_cannot_change_a_run_and_records_every_task_file(tmp_path):
    tree = {"model": {"path": str(tmp_path / "model")}, "method": {"name": "lora"},
            "tasks": [{"name": "a", "task": {"type": "classification"}, "data": {"train": str(tmp_path / "a.jsonl")}},
                      {"name": "b", "task": {"type": "regression"}, "data": {"train": str(tmp_path / "b.jsonl")}}]}
    write_jsonl(tmp_path / "a.jsonl", make_rows(4))
    cfg = config.validate(tree)
    keys = set(fingerprint.flatten(cfg))
    assert fingerprint.IGNORED <= keys  # every ignored key is a real one
    found = fingerprint.of(cfg)
    assert not fingerprint.IGNORED & set(found["config"])
    assert found["config"]["tasks[1].task.type"] == "regression" and found["config"]["method.rank_pattern"] == {}
    assert found["files"]["tasks[0].data.train"]["kind"] == "file"
    assert found["files"]["tasks[1].data.train"]["kind"] == "missing"
    assert found["files"]["model.path"] == {"path": str(tmp_path / "model"), "kind": "missing"}
    assert fingerprint.differences(found, json.loads(json.dumps(found))) == []
