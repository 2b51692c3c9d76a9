"""The benchmark compares like with like: the peers' prompt-masked targets are exactly the tokens tunelab's sft
task trains on, and the model-FLOPs count is the textbook 6N (full) / 4N + 6·adapters (LoRA) plus attention."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import make_chat_rows  # noqa: E402

from bench import common  # noqa: E402
from tunelab.config import ModelConfig  # noqa: E402
from tunelab.tasks import causal_lm  # noqa: E402


def test_peer_targets_equal_tunelab_sft_targets(tiny_chat_llama):
    info = {"task": "sft", "template": "chat", "train_on_prompt": False, "truncation": "cut"}
    _, tok = causal_lm.build_model(ModelConfig(path=str(tiny_chat_llama)), info)
    rows = [{**r, "row": i} for i, r in enumerate(make_chat_rows(20, seed=5), 1)]
    feats, _ = causal_lm.encode(rows, tok, info, 512)
    for r, f in zip(rows, feats):
        ids, labels = common.encode_chat(tok, r["messages"])
        assert ids == f["input_ids"] and labels == f["labels"]
        assert any(x != -100 for x in labels) and labels[0] == -100


def test_flops_per_token_is_the_textbook_count():
    cfg = {"hidden_size": 8, "num_hidden_layers": 2, "intermediate_size": 16, "num_attention_heads": 2,
           "num_key_value_heads": 1, "vocab_size": 100}
    per_layer = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 3 * 8 * 16  # q, k, v (one 4-wide kv head), o, gate/up/down
    n = 2 * per_layer + 8 * 100
    full = common.train_flops_per_token(cfg, "full", 0, context=10.0)
    assert full["matmul_params"] == n
    assert full["flops_per_token"] == pytest.approx(6 * n + 12 * 2 * 8 * 10.0)
    lora = common.train_flops_per_token(cfg, "lora", 2, context=10.0)
    adapters = 2 * 2 * (8 + 8 + 8 + 4 + 8 + 4 + 8 + 8 + 8 + 16 + 8 + 16 + 16 + 8)
    assert lora["adapter_params"] == adapters
    assert lora["flops_per_token"] == pytest.approx(4 * n + 6 * adapters + 12 * 2 * 8 * 10.0)


def test_merge_keeps_earlier_scenarios_with_their_own_settings():
    from bench import run

    earlier = {"machine": {"date": "2026-11-20T10:00:00"}, "settings": {"steps": 30, "repeats": 3, "bf16": False},
               "scenarios": {"lora-58m": {"median": {"old": 1}}, "cls-minilm": {"median": {"old": 2}}}}
    new = {"machine": {"date": "2026-11-24T15:00:00"}, "settings": {"steps": 10, "repeats": 2, "bf16": False},
           "scenarios": {"cls-minilm": {"median": {"new": 3},
                                        "measured": {"steps": 10, "repeats": 2, "bf16": False, "date": "2026-11-24"}}}}
    merged = run.merge(earlier, new)
    assert list(merged["scenarios"]) == ["lora-58m", "cls-minilm"]  # the bench's own order
    assert merged["scenarios"]["cls-minilm"]["median"] == {"new": 3}
    assert merged["scenarios"]["lora-58m"]["measured"] == {"steps": 30, "repeats": 3, "bf16": False,
                                                          "date": "2026-11-20T10:00:00"}
    assert merged["settings"]["steps"] == 10 and earlier["scenarios"]["lora-58m"] == {"median": {"old": 1}}
