"""Checkpoints, exact resume after a crash, and the NaN guard."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_rows, write_jsonl
from safetensors.torch import load_file

import tunelab
from tunelab import cli, runs, versions
from tunelab.errors import TunelabError
from tunelab.tasks import classification
from tunelab.training import checkpoint

QUIET = ["eval.base=false", "eval.linear_probe=false", "eval.samples=0", "eval.forgetting=none"]
METHODS = {"full": ["method.name=full"], "lora": ["method.name=lora", "method.r=4"]}


def _overrides(model_dir: Path, train: Path, method: str, **train_kw) -> list[str]:
    settings = {"max_steps": 24, "batch_size": 4, "grad_accum": 2, "checkpoint_every": 1, "eval_every": 10,
                "log_every": 1, "keep_finished_checkpoints": True, **train_kw}
    return [f"model.path={model_dir}", f"data.train={train}", *METHODS[method], *QUIET,
            *(f"train.{k}={v}" for k, v in settings.items())]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    artifact = run_dir / json.loads((run_dir / "summary.json").read_text())["artifact"]
    return {k: v for f in sorted(artifact.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(whole: Path, resumed: Path, when: str) -> None:
    """Bit-equal final weights and the same logged (step, loss) list: the resumed run is the uninterrupted one."""
    a, b = _weights(whole), _weights(resumed)
    assert a.keys() == b.keys() and len(a) > 0
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff == 0.0, f"{when}: weights differ by {diff}"
    losses = lambda d: [(r["step"], r["loss"]) for r in _records(d) if r["type"] == "train"]
    assert losses(resumed) == losses(whole)  # the log goes on from the checkpoint, without gaps or repeats


@pytest.fixture
def train_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", make_rows(120, seed=0))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_run_killed_at_a_random_step_resumes_to_the_same_weights(method, tiny_bert, train_file, tmp_path):
    """SIGKILL mid-run (dropout on, gradient accumulation 2, an evaluation every 10 steps), then --resume: the
    final weights equal those of a run never stopped, bit for bit on CPU fp32, and so do the logged losses."""
    overrides = _overrides(tiny_bert, train_file, method)
    whole = tunelab.train(None, overrides + [f"output_dir={tmp_path / 'whole'}"])

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({}))
    run_dir = tmp_path / "killed"
    kill_after = random.Random(f"{method}-{os.getpid()}").randint(3, 18)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(recipe), *overrides,
                             f"output_dir={run_dir}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while not (run_dir / checkpoint.DIR / f"step-{kill_after:07d}").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (run_dir / "summary.json").exists()

    resumed = tunelab.resume(run_dir)
    assert_same_run(whole.dir, resumed.dir, f"resumed after step {kill_after}")
    assert [r["type"] for r in _records(resumed.dir)].count("optimizer") == 1
    assert resumed.summary["eval"] == whole.summary["eval"]


def test_keeps_the_last_k_and_the_best(tiny_bert, train_file, tmp_path):
    run = tunelab.train(None, _overrides(tiny_bert, train_file, "lora", max_steps=12, eval_every=3, keep_checkpoints=2)
                        + [f"output_dir={tmp_path / 'run'}", "train.metric=loss"])
    kept = sorted(p.name for p in (run.dir / checkpoint.DIR).iterdir())
    best = run.summary["best_step"]
    named = {json.loads((run.dir / checkpoint.DIR / f"step-{s:07d}" / "state.json").read_text())["best"]["step"]
             for s in (11, 12)}  # and the best step each of the last two names: the fallback of a damaged newest
    assert kept == sorted({f"step-{s:07d}" for s in {11, 12, best} | named})
    for name in kept:  # every one complete and verifiable
        assert checkpoint.Checkpoints(run.dir, 2).problem(run.dir / checkpoint.DIR / name) is None


def _crashed_copy(run_dir: Path, dest: Path, last_step: int) -> Path:
    """The run as it would be had it died right after checkpointing `last_step`."""
    shutil.copytree(run_dir, dest)
    for p in (dest / checkpoint.DIR).glob("step-*"):
        if int(p.name.split("-")[1]) > last_step:
            shutil.rmtree(p)
    (dest / "summary.json").unlink()
    return dest


def test_a_damaged_checkpoint_is_skipped_for_the_one_before(tiny_bert, train_file, tmp_path, capsys):
    run = tunelab.train(None, _overrides(tiny_bert, train_file, "full", max_steps=8, keep_checkpoints=3)
                        + [f"output_dir={tmp_path / 'whole'}"])
    crashed = _crashed_copy(run.dir, tmp_path / "crashed", 7)
    weights = crashed / checkpoint.DIR / "step-0000007" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # cut short, as by a full disk
    capsys.readouterr()
    resumed = tunelab.resume(crashed)
    out = capsys.readouterr().out
    assert "checkpoint step-0000007 is damaged (trainable.safetensors does not match its manifest" in out
    assert "resumed from step-0000006" in out
    a, b = _weights(run.dir), _weights(resumed.dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_full_disk_during_a_save_leaves_the_previous_checkpoint_intact(tiny_bert, train_file, tmp_path, monkeypatch):
    real_save = checkpoint.save_file
    calls = {"n": 0}

    def save_until_the_disk_is_full(tensors, path):
        calls["n"] += 1
        if calls["n"] > 3 * 3:  # three checkpoints of three files (trainable, optimizer, rng) fit, then none
            with open(path, "wb") as f:
                f.write(b"\0" * 10)  # half a file, then the error
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", save_until_the_disk_is_full)
    out = tmp_path / "run"
    with pytest.raises(TunelabError, match=r"Could not write the checkpoint of step 4 .*No space left on device.*"
                                           r"previous checkpoints are intact.*--resume"):
        tunelab.train(None, _overrides(tiny_bert, train_file, "full", max_steps=8) + [f"output_dir={out}"])
    ckpts = checkpoint.Checkpoints(out, 2)
    assert [p.name for p in ckpts.list()] == ["step-0000002", "step-0000003"]
    assert not list((out / checkpoint.DIR).glob(".tmp-*"))
    assert all(ckpts.problem(p) is None for p in ckpts.list())
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    resumed = tunelab.resume(out)  # and the run goes on from there
    assert resumed.summary["steps"] == 8


def test_resume_refuses_what_it_cannot_continue(tiny_bert, train_file, tmp_path):
    run = tunelab.train(None, _overrides(tiny_bert, train_file, "lora", max_steps=2) + [f"output_dir={tmp_path / 'done'}"])
    with pytest.raises(TunelabError, match="that run finished"):
        tunelab.resume(run.dir)
    with pytest.raises(TunelabError, match="not a tunelab run directory"):
        tunelab.resume(tmp_path)
    crashed = _crashed_copy(run.dir, tmp_path / "crashed", 0)
    with pytest.raises(TunelabError, match="no usable checkpoint"):
        tunelab.resume(crashed)


def test_cli_resume_takes_no_recipe(tiny_bert, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["tunelab", "train", "recipe.yaml", "--resume", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2 and "give no recipe or overrides with it" in capsys.readouterr().err.replace("\n", " ")


def test_non_finite_steps_are_skipped_and_too_many_stop_the_run(tiny_bert, train_file, tmp_path, monkeypatch):
    real_loss, calls = classification.loss, {"n": 0}
    poisoned = set()

    def loss(model, batch, info):
        calls["n"] += 1
        value = real_loss(model, batch, info)
        return value * float("nan") if (calls["n"] + 1) // 2 in poisoned else value  # 2 micro-batches a step

    monkeypatch.setattr(classification, "loss", loss)
    poisoned.update({3})
    run = tunelab.train(None, _overrides(tiny_bert, train_file, "full", max_steps=6) + [f"output_dir={tmp_path / 'one'}"])
    skipped = [r for r in _records(run.dir) if r["type"] == "skipped"]
    assert [(r["step"], r["in_a_row"]) for r in skipped] == [(3, 1)]
    steps = {r["step"]: r for r in _records(run.dir) if r["type"] == "train"}
    assert all(steps[s]["loss"] == steps[s]["loss"] for s in (1, 2, 4, 5, 6))  # finite around it
    params = [p for p in tunelab.load(run.dir).model.parameters()]
    assert all(torch.isfinite(p).all() for p in params)

    calls["n"] = 0
    poisoned.clear()
    poisoned.update(range(4, 100))
    out = tmp_path / "many"
    with pytest.raises(TunelabError, match=r"Training stopped at step 8: the loss or gradient was not finite for 5 "
                                           r"steps in a row.*last good checkpoint is .*step-0000007"):
        tunelab.train(None, _overrides(tiny_bert, train_file, "full", max_steps=20, max_bad_steps=5)
                      + [f"output_dir={out}"])
    ckpt = checkpoint.Checkpoints(out, 2)
    latest = ckpt.latest()
    assert all(torch.isfinite(t).all() for t in latest[2]["trainable"].values())


def test_a_loss_spike_is_reported(tiny_bert, train_file, tmp_path, monkeypatch):
    real_loss, calls = classification.loss, {"n": 0}

    def loss(model, batch, info):
        calls["n"] += 1
        value = real_loss(model, batch, info)
        return value * 20 if (calls["n"] + 1) // 2 == 15 else value

    monkeypatch.setattr(classification, "loss", loss)
    run = tunelab.train(None, _overrides(tiny_bert, train_file, "full", max_steps=16) + [f"output_dir={tmp_path / 'r'}"])
    assert [r["step"] for r in _records(run.dir) if r["type"] == "loss_spike"] == [15]


def test_versions_are_recorded_and_a_difference_is_named(tiny_bert, train_file, tmp_path, capsys):
    run = tunelab.train(None, _overrides(tiny_bert, train_file, "lora", max_steps=2) + [f"output_dir={tmp_path / 'r'}"])
    recorded = json.loads((run.dir / "versions.json").read_text())
    assert recorded == versions.current() and recorded["torch"] == torch.__version__
    recorded["transformers"] = "4.0.0"
    (run.dir / "versions.json").write_text(json.dumps(recorded))
    capsys.readouterr()
    tunelab.load(run.dir)
    err = capsys.readouterr().err
    assert "made with other library versions: transformers 4.0.0 -> " in err


def test_a_finished_run_drops_its_checkpoints_unless_asked(tiny_bert, train_file, tmp_path):
    run = tunelab.train(None, _overrides(tiny_bert, train_file, "lora", max_steps=4, keep_finished_checkpoints=False)
                        + [f"output_dir={tmp_path / 'r'}"])
    assert not (run.dir / checkpoint.DIR).exists() and (run.dir / "summary.json").is_file()


def test_gradual_unfreezing_resumes_with_the_blocks_it_had_opened(tiny_bert, train_file, tmp_path):
    overrides = [f"model.path={tiny_bert}", f"data.train={train_file}", "method.name=freeze", "method.freeze_layers=2",
                 "train.unfreeze=gradual", "train.unfreeze_every=3", *QUIET,
                 *(f"train.{k}={v}" for k, v in {"max_steps": 10, "batch_size": 4, "checkpoint_every": 1,
                                                  "eval_every": 100, "keep_checkpoints": 20,
                                                  "keep_finished_checkpoints": True}.items())]
    run = tunelab.train(None, overrides + [f"output_dir={tmp_path / 'whole'}"])
    assert [r["step"] for r in _records(run.dir) if r["type"] == "unfreeze"][:2] == [3, 6]
    resumed = tunelab.resume(_crashed_copy(run.dir, tmp_path / "crashed", 7))
    a, b = _weights(run.dir), _weights(resumed.dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _save_fake(ckpts: checkpoint.Checkpoints, step: int, best: int | None) -> None:
    """A checkpoint of `step` whose state names `best` as its best step, as the loop writes them."""
    state = {"step": step, "best": {"value": None if best is None else 1.0, "step": best or 0, "metrics": None}}
    ckpts.save(step, {"trainable": {"w": torch.full((2,), float(step))}}, state, best)


def test_pruning_keeps_the_best_step_that_a_kept_checkpoint_names(tmp_path):
    """keep=2: at step 9 the last two are 6 (whose best is 3) and 9 (best 9). Step 3 stays, so a damaged step 9
    falls back to step 6 with its best weights; once no kept checkpoint names step 3, it goes."""
    ckpts = checkpoint.Checkpoints(tmp_path, 2)
    for step, best in ((3, 3), (6, 3), (9, 9)):
        _save_fake(ckpts, step, best)
    assert [p.name for p in ckpts.list()] == ["step-0000003", "step-0000006", "step-0000009"]
    weights = tmp_path / checkpoint.DIR / "step-0000009" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    path, state, _ = ckpts.latest(lambda message: None)
    assert path.name == "step-0000006"
    assert float(ckpts.read(state["best"]["step"])["trainable"]["w"][0]) == 3.0
    _save_fake(ckpts, 12, 12)
    assert [p.name for p in ckpts.list()] == ["step-0000009", "step-0000012"]


def test_checkpoints_are_ordered_by_step_number_not_by_name(tmp_path):
    ckpts = checkpoint.Checkpoints(tmp_path, 1)
    for step in (9_999_999, 10_000_000):  # "step-10000000" < "step-9999999" as names
        _save_fake(ckpts, step, None)
    assert [p.name for p in ckpts.list()] == ["step-10000000"]
    assert ckpts.latest()[1]["step"] == 10_000_000


def test_stale_temporary_checkpoints_are_removed_when_saving_and_on_resume(tiny_bert, train_file, tmp_path):
    ckpts = checkpoint.Checkpoints(tmp_path, 2)
    stale = tmp_path / checkpoint.DIR / ".tmp-step-0000002"
    stale.mkdir(parents=True)
    (stale / "trainable.safetensors").write_bytes(b"\0" * 10)  # a save killed half-way
    _save_fake(ckpts, 5, None)
    assert not stale.exists() and [p.name for p in ckpts.list()] == ["step-0000005"]

    run = tunelab.train(None, _overrides(tiny_bert, train_file, "lora", max_steps=3) + [f"output_dir={tmp_path / 'r'}"])
    crashed = _crashed_copy(run.dir, tmp_path / "crashed", 2)
    stale = crashed / checkpoint.DIR / ".tmp-step-0000003"
    stale.mkdir()
    assert runs.resumable(crashed)[1]["step"] == 2
    assert not stale.exists()


def _strict_records(run_dir: Path) -> list[dict]:
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return [json.loads(x, parse_constant=refuse) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_metrics_log_is_valid_json_and_on_disk_before_a_checkpoint_records_its_size(tiny_bert, train_file, tmp_path,
                                                                                    monkeypatch):
    real_loss, calls = classification.loss, {"n": 0}

    def loss(model, batch, info):  # step 2's loss is NaN: the guard logs it, and the train record's mean of step 2
        calls["n"] += 1
        value = real_loss(model, batch, info)
        return value * float("nan") if (calls["n"] + 1) // 2 == 2 else value

    synced = []
    real_fsync = checkpoint._fsync

    def fsync(path):
        synced.append(Path(path).name)
        real_fsync(path)

    monkeypatch.setattr(classification, "loss", loss)
    monkeypatch.setattr(checkpoint, "_fsync", fsync)
    run = tunelab.train(None, _overrides(tiny_bert, train_file, "full", max_steps=3) + [f"output_dir={tmp_path / 'r'}"])
    records = _strict_records(run.dir)  # no NaN / Infinity: every line is JSON
    skipped = [r for r in records if r["type"] == "skipped"]
    assert [(r["step"], r["loss"]) for r in skipped] == [(2, None)]
    # each of the 3 checkpoints fsyncs the log first, then writes its files (the state with the log's size in it)
    chunks = " ".join(synced).split("metrics.jsonl")
    assert chunks[0] == "" and len(chunks) == 4 and all("state.json" in c for c in chunks[1:])


def test_a_full_disk_in_safetensors_is_one_paragraph_and_keeps_the_earlier_checkpoints(tiny_bert, train_file, tmp_path,
                                                                                      monkeypatch):
    from safetensors import SafetensorError

    real_save, calls = checkpoint.save_file, {"n": 0}

    def save(tensors, path):
        calls["n"] += 1
        if calls["n"] > 3 * 3:  # three checkpoints of three files fit
            Path(path).write_bytes(b"\0" * 10)
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" }) No space left on device (os error 28)')
        real_save(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", save)
    out = tmp_path / "run"
    with pytest.raises(TunelabError) as e:
        tunelab.train(None, _overrides(tiny_bert, train_file, "full", max_steps=8) + [f"output_dir={out}"])
    message = str(e.value)
    assert message.startswith("Could not write the checkpoint of step 4 ") and "\n" not in message
    assert ": No space left on device. The previous checkpoints are intact" in message and "--resume" in message
    ckpts = checkpoint.Checkpoints(out, 2)
    assert [p.name for p in ckpts.list()] == ["step-0000002", "step-0000003"]
    assert all(ckpts.problem(p) is None for p in ckpts.list())
    assert not list((out / checkpoint.DIR).glob(".tmp-*"))
