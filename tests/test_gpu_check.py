"""bench/gpu_check.py: its dry run without CUDA (every step skipped with the reason, the results file written), its
step runner (a real step that fails, and one killed at its budget), and the CUDA-only tests it runs on a GPU
(`-k cuda`): skipped here, where torch sees no CUDA device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import gpu_check  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh runs it)")


def test_the_dry_run_skips_every_step_and_writes_the_results_file(tmp_path):
    results = tmp_path / "out" / "gpu_check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # a dry run on any machine, a GPU one too
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--results", str(results)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(results.read_text())
    assert data["dry_run"] is True
    assert list(data["steps"]) == [name for name, _ in gpu_check.STEPS]
    for name, step in data["steps"].items():
        assert step["status"] == "skipped" and "no CUDA device" in step["reason"], name
        assert step["budget_s"] == dict(gpu_check.STEPS)[name]
    assert data["machine"]["commit"] and data["machine"]["torch"] == torch.__version__
    assert f"7 skipped; written {results}" in proc.stdout
    assert not list(results.parent.glob("*.tmp"))  # written under a temp name, then renamed


def test_the_budgets_fit_one_device_call():
    """The device tool runs one command for at most 600 s: the steps' budgets leave room for the process start."""
    assert sum(budget for _, budget in gpu_check.STEPS) <= 570
    assert set(gpu_check.STEP_FUNCTIONS) == {name for name, _ in gpu_check.STEPS}


def test_a_step_that_fails_says_why_and_one_past_its_budget_is_killed(tmp_path, monkeypatch):
    """The install step, for real, with no wheels to install from (bitsandbytes is absent on this CPU machine, or
    another of the packages the GPU image lacks), then the same step given no time at all."""
    monkeypatch.setattr(gpu_check, "CACHE", tmp_path)
    env = {**gpu_check.step_env(), "GPU_CHECK_WHEELS": str(tmp_path / "no-wheels")}
    step = gpu_check.run_step("install", 120, env)
    missing = [d for m, d in gpu_check.NEEDED.items() if __import__("importlib").util.find_spec(m) is None]
    if missing:
        assert step["status"] == "failed" and "--fetch-wheels" in step["reason"] and step["missing"] == missing
    else:
        assert step["status"] == "ok" and step["installed"] == []
    assert Path(step["log"]).name == "install.log" and step["seconds"] < step["budget_s"]
    killed = gpu_check.run_step("install", 0.01, env)
    assert killed["status"] == "timeout" and "0.01 s budget" in killed["reason"]


# -- what runs only on CUDA (the check's cuda_tests step) --------------------------------------------------

@needs_cuda
def test_cuda_lora_over_a_bf16_base_keeps_float32_adapters_and_grads(tiny_chat_llama):
    from transformers import AutoModelForCausalLM

    from tunelab import methods
    from tunelab.config import LoraConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_chat_llama, dtype=torch.bfloat16).cuda()
    model = methods.prepare(model, LoraConfig(name="lora", r=4, target_modules="all-linear"), [])
    ids = torch.randint(3, model.config.vocab_size, (2, 16), device="cuda")
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in trained)
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert torch.isfinite(loss)


@needs_cuda
def test_cuda_training_run_on_a_bf16_base_with_padding_free_rows(tiny_chat_llama, tmp_path):
    from conftest import make_chat_rows, write_jsonl

    import tunelab

    train = write_jsonl(tmp_path / "train.jsonl", make_chat_rows(32, seed=3))
    run = tunelab.train(None, [f"model.path={tiny_chat_llama}", "model.device=cuda", "model.dtype=bfloat16",
                               f"data.train={train}", "task.type=sft", "method.name=lora", "train.padding_free=true",
                               "train.max_steps=3", "train.batch_size=8", "eval.samples=0", "eval.forgetting=none",
                               f"output_dir={tmp_path / 'run'}"])
    records = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r["type"] == "padding_free" and r["on"] for r in records)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if r["type"] == "train")


@needs_cuda
def test_cuda_qlora_with_bitsandbytes_quantizes_every_linear_layer(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab import methods
    from tunelab.config import QLoraConfig
    from tunelab.methods import qlora

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=256)).to(torch.bfloat16)
    model = methods.prepare(model.cuda(), QLoraConfig(name="qlora", r=4, backend="bitsandbytes"), [])
    assert not qlora.memory_report(model)["unquantized_layers"]
    ids = torch.randint(0, 256, (2, 16), device="cuda")
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and trained and all(p.grad.dtype == torch.float32 for p in trained)
