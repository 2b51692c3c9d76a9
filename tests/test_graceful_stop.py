"""Stopping a run on purpose (training/stop.py): SIGTERM or Ctrl-C while `tunelab train` trains finishes the step,
saves a checkpoint, exits 130 saying how to resume, and --resume finishes the run with the weights it would have
had."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml
from conftest import make_rows, write_jsonl
from test_resume import _overrides, _records, assert_same_run

import tunelab
from tunelab import config, pipeline
from tunelab.training import checkpoint, stop

STEPS = 60  # long enough that the signal, sent once step 3 is logged, arrives well before the end


def test_sigterm_mid_training_saves_a_checkpoint_and_resumes_to_the_same_weights(tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(120, seed=0))
    # no periodic checkpoints and one evaluation at the end: the only checkpoint is the one the stop writes
    overrides = _overrides(tiny_bert, train, "lora", max_steps=STEPS, checkpoint_every="null", eval_every=1000)
    whole = tunelab.train(None, overrides + [f"output_dir={tmp_path / 'whole'}"])

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({}))
    run_dir = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(recipe), *overrides,
                             f"output_dir={run_dir}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not any(r.get("type") == "train" and r["step"] >= 3 for r in _logged(run_dir)):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    text = out.decode() + err.decode()
    assert proc.returncode == 130, text[-2000:]

    last = _records(run_dir)[-1]
    step = last["after_step"]
    assert last["type"] == "stopped" and last["signal"] == "SIGTERM" and 3 <= step < STEPS
    assert f"stopped by SIGTERM after step {step} of {STEPS}" in text
    assert f"tunelab train --resume {run_dir}" in text and "interrupted" in text
    saved = sorted(p.name for p in (run_dir / checkpoint.DIR).iterdir())
    assert saved == [f"step-{step:07d}"] and not (run_dir / "summary.json").exists()

    resumed = tunelab.resume(run_dir)
    assert_same_run(whole.dir, resumed.dir, f"stopped after step {step}")


def _logged(run_dir) -> list[dict]:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [json.loads(x) for x in lines if x.endswith("}")]  # a line being written is not complete yet


def test_a_second_signal_stops_at_once_and_the_handlers_come_back():
    before = {s: signal.getsignal(s) for s in stop.SIGNALS}
    with stop.on_signal() as halt:
        signal.raise_signal(signal.SIGTERM)
        assert halt.asked() and halt.signal == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert {s: signal.getsignal(s) for s in stop.SIGNALS} == before


def test_outside_the_main_thread_nothing_is_installed():
    seen = {}

    def body():
        with stop.on_signal() as halt:
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            seen["asked"] = halt.asked()

    before = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == {"handler": before, "asked": False}


def test_sigterm_outside_the_loop_is_an_interrupt(tmp_path):
    """While a run loads or evaluates, SIGTERM ends `tunelab train` as Ctrl-C does (exit 130), not by the signal."""
    code = ("import os, signal, sys, time\n"
            "from tunelab.training import stop\n"
            "try:\n"
            "    with stop.terminate_as_interrupt():\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "        time.sleep(30)\n"
            "except KeyboardInterrupt:\n"
            "    sys.exit(130)\n")
    done = subprocess.run([sys.executable, "-c", code], timeout=60, env={**os.environ})
    assert done.returncode == 130


@pytest.mark.parametrize("save", [True, False])
def test_a_signal_at_an_evaluation_stops_after_that_step(save, tiny_bert, tmp_path, capsys):
    """In this process, the signal raised while step 4 is evaluated: the loop stops after step 4 (whose checkpoint
    is the evaluation's own); without checkpoints it says the run cannot be resumed."""
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(64, seed=0))
    out = tmp_path / "run"
    cfg = config.load(None, _overrides(tiny_bert, train, "lora", max_steps=12, checkpoint_every="null", eval_every=4,
                                       save_checkpoints=save) + [f"output_dir={out}"])

    def signal_at_4(record):
        if record["step"] == 4:
            signal.raise_signal(signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(stop.Interrupted) as stopped:
        pipeline.train(cfg, on_eval=signal_at_4)
    assert signal.getsignal(signal.SIGTERM) is before
    assert str(stopped.value).startswith("stopped by SIGTERM after step 4 of 12; ")
    assert str(stopped.value) in capsys.readouterr().out
    assert _records(out)[-1] == {"type": "stopped", "after_step": 4, "signal": "SIGTERM", "checkpoint": save}
    if save:
        assert sorted(p.name for p in (out / checkpoint.DIR).iterdir()) == ["step-0000004"]
    else:
        assert "train.save_checkpoints is off, so there is no checkpoint to resume from" in str(stopped.value)
        assert not (out / checkpoint.DIR).exists()
