"""`tunelab compare`: every method on the same data, seed and budget, one process each; the table's figures come
from each run's own summary, methods that cannot apply are skipped with the reason, nothing else is lost."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import make_chat_rows, make_rows, write_jsonl

from tunelab import TunelabError, compare


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("compare")
    rows = make_rows(200, seed=4)
    train, test = write_jsonl(root / "train.jsonl", rows[:160]), write_jsonl(root / "test.jsonl", rows[160:])
    probe = write_jsonl(root / "probe.jsonl", [{"text": r["text"], "label": r["label"]} for r in make_rows(60, seed=9)])
    recipe = root / "recipe.yaml"
    recipe.write_text(f"""
model: {{path: {tiny_bert}, device: cpu}}
data: {{train: {train}, test: {test}}}
method: {{name: lora, r: 4, alpha: 8, target_modules: all-linear}}
train: {{lr: 2.0e-3, batch_size: 16, epochs: 1}}
eval: {{forgetting: {probe}}}
""")
    messages = []
    result = compare.run(str(recipe), [], ["full", "lora", "prefix"], str(root / "cmp"), {"full": 1e-3}, steps=6,
                         echo=messages.append, settings={"prefix": {"num_virtual_tokens": 5}})
    return root / "cmp", result, messages


def test_every_method_has_a_row_measured_from_its_own_run(compared):
    out, rows, _ = compared
    assert [r["method"] for r in rows] == ["full", "lora", "prefix"] and all(r["status"] == "ok" for r in rows)
    for r in rows:
        summary = json.loads((out / "runs" / r["method"] / "summary.json").read_text())
        assert r["steps"] == summary["steps"] == 6
        assert r["tuned"] == summary["test"]["accuracy"] and r["base"] == summary["base"]["test"]["accuracy"]
        assert r["trainable_params"] == summary["trainable_params"] and r["storage_mb"] == summary["artifact_mb"]
        assert r["peak_memory_mb"] > 100 and r["latency_ms"] > 0
        assert r["forgetting"]["kind"] == "probe" and r["forgetting"] == summary["forgetting"]
    full, lora, prefix = rows
    # the same data, seed and split for all: the base model scores the same everywhere
    assert full["base"] == lora["base"] == prefix["base"]
    assert full["forgetting"]["before"] == lora["forgetting"]["before"] == prefix["forgetting"]["before"]
    assert full["trainable_percent"] == pytest.approx(100) and lora["trainable_percent"] < 50
    assert lora["storage_mb"] < full["storage_mb"]
    # LR: --lr for full, the recipe's own for its method (lora), the usual one for the rest
    assert (full["lr"], lora["lr"], prefix["lr"]) == (1e-3, 2e-3, compare.DEFAULT_LR["prefix"])
    # LoRA merges into the weights; prefix tuning cannot, so it has no merged latency
    assert lora["latency_merged_ms"] > 0 and prefix["latency_merged_ms"] is None
    # the linear probe was fitted once (first run) and shared
    assert full["linear_probe"] == lora["linear_probe"] == prefix["linear_probe"] is not None


def test_the_recipe_settings_carry_over_where_the_method_has_them(compared):
    import yaml

    out, _, _ = compared
    lora = yaml.safe_load((out / "recipes" / "lora.yaml").read_text())["method"]
    prefix = yaml.safe_load((out / "recipes" / "prefix.yaml").read_text())["method"]
    assert (lora["r"], lora["alpha"]) == (4, 8) and "r" not in prefix
    assert prefix["num_virtual_tokens"] == 5  # from --set prefix.num_virtual_tokens=5
    summary = json.loads((out / "runs" / "prefix" / "summary.json").read_text())
    assert summary["trainable_params"] == json.loads((out / "compare.json").read_text())[2]["trainable_params"]


def test_tables_and_report_are_written(compared):
    out, rows, messages = compared
    with (out / "compare.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [t["method"] for t in table] == ["full", "lora", "prefix"]
    assert float(table[1]["tuned"]) == rows[1]["tuned"]
    md = (out / "compare.md").read_text()
    assert md.count("\n") == 2 + 3 and "test accuracy" in md and "forgetting: accuracy" in md
    assert json.loads((out / "compare.json").read_text()) == json.loads(json.dumps(rows))
    assert (out / "report.html").is_file() and (out / "runs" / "lora" / "report.html").is_file()
    assert any("compare directory" in m for m in messages)


def test_a_method_that_cannot_apply_is_skipped_with_its_reason(tmp_path, tiny_chat_llama):
    train = write_jsonl(tmp_path / "train.jsonl", make_chat_rows(60, seed=3))
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"""
model: {{path: {tiny_chat_llama}, device: cpu}}
data: {{train: {train}, max_length: 48, dedupe: false}}
task: {{type: sft}}
method: {{name: lora, r: 4}}
train: {{batch_size: 8}}
eval: {{samples: 0, forgetting: none}}
""")
    rows = compare.run(str(recipe), [], ["bitfit", "lora"], str(tmp_path / "cmp"), steps=2, echo=lambda m: None)
    assert rows[0]["status"] == "skipped" and "bias" in rows[0]["reason"].lower()
    assert rows[1]["status"] == "ok" and rows[1]["metric"] == "loss"
    assert "skipped: " in (tmp_path / "cmp" / "compare.md").read_text()


def test_bad_arguments_are_clear(tmp_path):
    with pytest.raises(TunelabError, match=r"lorra is not a tunelab method \(did you mean lora\?\)"):
        compare.parse_methods("full,lorra")
    with pytest.raises(TunelabError, match="names a method twice"):
        compare.parse_methods("lora,lora")
    with pytest.raises(TunelabError, match="expected METHOD=VALUE"):
        compare.parse_lrs(["lora:1e-3"])
    assert compare.parse_settings(["freeze.freeze_layers=4", "lora.r=16"], ["freeze", "lora"]) == \
        {"freeze": {"freeze_layers": 4}, "lora": {"r": 16}}
    with pytest.raises(TunelabError, match="expected METHOD.KEY=VALUE"):
        compare.parse_settings(["freeze_layers=4"], ["freeze"])
    with pytest.raises(TunelabError, match="'dora' is not among --methods"):
        compare.parse_settings(["dora.r=4"], ["lora"])


def test_a_bad_method_setting_stops_before_any_training(tmp_path, tiny_bert):
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(40))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{path: {tiny_bert}}}\ndata: {{train: {train}}}\n")
    with pytest.raises(TunelabError, match=r"--set for lora: method.r: .*greater than or equal to 1"):
        compare.run(str(recipe), [], ["full", "lora"], str(tmp_path / "cmp"), settings={"lora": {"r": 0}})
    assert not (tmp_path / "cmp").exists()


def test_a_child_run_reports_its_own_peak_memory_not_its_parents():
    """compare's parent process grows (it loads every trained model); ru_maxrss of a child starts at the parent's
    RSS, so the peak a run reports must come from VmHWM."""
    import subprocess
    import sys

    parent = ("import subprocess, sys, torch\n"
              "big = torch.ones(300 * 2**20)  # 1.2 GB resident in the parent\n"
              "child = 'import resource; from tunelab.runs import peak_rss; '"
              " 'print(peak_rss() / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)'\n"
              "print(subprocess.run([sys.executable, '-c', child], capture_output=True, text=True, check=True).stdout)\n")
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True, timeout=120).stdout
    own, inherited = map(float, out.split())
    assert inherited > 1200 and own < 800, (own, inherited)  # the child itself: Python + torch + transformers
