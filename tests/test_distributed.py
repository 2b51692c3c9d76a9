"""Several processes on PyTorch's own engine: torchrun (through `tunelab train --nproc 2`), gloo on CPU, DDP."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FORWARD_OPS, make_rows, tol, write_jsonl
from safetensors.torch import load_file

import tunelab
from tunelab.training import checkpoint

# dropout off: each process draws its own masks, so with dropout the runs would differ by design
SETTINGS = ["model.hidden_dropout=0", "model.attention_dropout=0", "eval.base=false", "eval.linear_probe=false",
            "eval.samples=0", "eval.forgetting=none", "train.max_steps=6", "train.batch_size=8", "train.grad_accum=2",
            "train.log_every=1", "train.eval_every=3", "train.checkpoint_every=1", "train.keep_checkpoints=6",
            "train.keep_finished_checkpoints=true"]
METHODS = {"lora": ["method.name=lora", "method.r=4"], "full": ["method.name=full"]}
# Two processes sum the gradient in another order than one. Every step's gradient rounds like a forward and backward
# pass over its 16 examples (of up to ~12 tokens), and carries the earlier steps' rounding through the weights: the
# n·eps bound over the run's chain of steps, times the largest gradient norm. A logged loss is a mean cross-entropy
# of 2 labels whose logits stay within +-2 (terms up to 4 + log 2), rounding like a forward pass a step.
STEP_OPS, STEPS = 2 * FORWARD_OPS + 16 * 12, 6
LOSS_TOL = tol(4 + math.log(2), STEPS * (FORWARD_OPS + 16))


def _adam_apart(run_dir: Path, steps: int) -> float:
    """How far apart two AdamW runs whose gradients differ by rounding can leave a weight after `steps` steps:
    Adam normalises a gradient, so a near-0 one dominated by rounding moves its weight by a full step either way,
    and a step is at most lr (1 - beta1) / sqrt(1 - beta2) = 3.16 lr (Kingma & Ba, section 2.1)."""
    lr = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lr"]
    return steps * 2 * lr * (1 - 0.9) / math.sqrt(1 - 0.999)


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tunelab", "train", str(recipe), *args], env=env,
                          capture_output=True, text=True, timeout=600)


def _records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    artifact = run_dir / json.loads((run_dir / "summary.json").read_text())["artifact"]
    return {k: v for f in sorted(artifact.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_processes_follow_the_loss_curve_of_one(method, tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(90, seed=2))  # uneven: the last step's share differs
    overrides = [f"model.path={tiny_bert}", f"data.train={train}", *METHODS[method], *SETTINGS]
    one = tunelab.train(None, overrides + [f"output_dir={tmp_path / 'one'}"])
    done = _cli(tmp_path, "--nproc", "2", *overrides, f"output_dir={tmp_path / 'two'}")
    assert done.returncode == 0, done.stderr[-3000:]
    two = tmp_path / "two"

    steps = lambda d: [(r["step"], r["loss"], r["tokens"]) for r in _records(d, "train")]
    got, want = steps(two), steps(one.dir)
    # the gradient, not only the loss: AdamW would hide a gradient off by a constant factor in the weights
    norms = lambda d: [r["grad_norm"] for r in _records(d, "train")]
    assert norms(two) == pytest.approx(norms(one.dir), abs=tol(max(norms(one.dir)), STEPS * STEP_OPS))
    assert [s for s, _, _ in got] == [1, 2, 3, 4, 5, 6]
    assert [t for _, _, t in got] == [t for _, _, t in want]  # the same examples, all of them, once
    assert [l for _, l, _ in got] == pytest.approx([l for _, l, _ in want], abs=LOSS_TOL)
    evals = lambda d: [r["loss"] for r in _records(d, "eval")]
    assert evals(two) == pytest.approx(evals(one.dir), abs=LOSS_TOL)
    a, b = _weights(one.dir), _weights(two)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= _adam_apart(one.dir, STEPS)
    # full fine-tuning is sharded (FSDP2), adapters replicated (DDP); only the first process wrote the log
    assert _records(two, "distributed") == [{"type": "distributed", "processes": 2, "backend": "gloo",
                                             "strategy": "fsdp2" if method == "full" else "ddp"}]
    assert len(_records(two, "optimizer")) == 1
    assert done.stdout.count("step 3: validation") == 1, done.stdout[-2000:]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_checkpoint_of_two_processes_resumes_in_one(method, tiny_bert, tmp_path):
    """Checkpoints hold whole tensors (FSDP2's shards gathered), so any process count can go on from them."""
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(90, seed=2))
    overrides = [f"model.path={tiny_bert}", f"data.train={train}", *METHODS[method], *SETTINGS]
    two = tmp_path / "two"
    done = _cli(tmp_path, "--nproc", "2", *overrides, f"output_dir={two}")
    assert done.returncode == 0, done.stderr[-3000:]
    crashed = tmp_path / "crashed"
    shutil.copytree(two, crashed)
    for p in (crashed / checkpoint.DIR).glob("step-*"):
        if int(p.name.split("-")[1]) > 4:
            shutil.rmtree(p)
    (crashed / "summary.json").unlink()
    resumed = tunelab.resume(crashed)  # one process now
    losses = lambda d: [r["loss"] for r in _records(d, "train")]
    assert losses(resumed.dir) == pytest.approx(losses(two), abs=LOSS_TOL)
    a, b = _weights(two), _weights(resumed.dir)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= _adam_apart(two, 2)  # steps 5 and 6 in one process
