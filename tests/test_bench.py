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


# -- base precision variants (--precision) --------------------------------------------------------------------

def _precision_run(runner, precision, losses, heldout, tok_s, rss):
    return {"runner": runner, "precision": precision, "label": f"{runner} {precision}", "ok": True,
            "tokens_per_s": tok_s, "examples_per_s": tok_s / 100, "peak_rss_mb": rss, "time_to_first_step_s": 1.0,
            "losses": losses, "last_loss": losses[-1], "last5_loss": sum(losses) / len(losses),
            "heldout_loss": heldout, "other_cpu_cores": 0.0, "settings": precision}


def test_precision_variants_are_compared_with_fp32_step_by_step_and_held_out():
    from bench import run

    runs = [_precision_run("tunelab", "fp32", [2.0, 1.5, 1.0], 1.2, 100.0, 1000.0),
            _precision_run("tunelab", "bf16-base", [2.0, 1.509, 1.005], 1.2, 130.0, 700.0),  # 0.6 % at most
            _precision_run("tunelab", "autocast", [2.0, 1.5, 1.02], 1.2, 110.0, 1100.0),  # 2 % at the last step
            _precision_run("trainer", "fp32", [2.0, 1.5, 1.0], 1.2, 50.0, 2000.0),
            _precision_run("trainer", "bf16-base", [2.0, 1.5, 1.0], 1.25, 60.0, 1500.0)]  # held-out 4.2 % off
    labels = [run.label(r, p, ["fp32", "bf16-base", "autocast"]) for p in ("fp32", "bf16-base", "autocast")
              for r in ("tunelab", "trainer")]
    s = run.summarize(runs, labels, {"flops": {"flops_per_token": 1e6}}, {"float32": 1e9, "bfloat16": 4e9})
    v = s["precision_vs_fp32"]
    assert set(v) == {"tunelab bf16-base", "tunelab autocast", "trainer bf16-base"}
    assert v["tunelab bf16-base"]["tokens_per_s"] == pytest.approx(1.3) and v["tunelab bf16-base"]["peak_rss_mb"] == 0.7
    assert v["tunelab bf16-base"]["step_loss_gap"] == pytest.approx(0.006) and v["tunelab bf16-base"]["losses_agree"]
    assert v["tunelab autocast"]["step_loss_gap"] == pytest.approx(0.02) and not v["tunelab autocast"]["losses_agree"]
    assert v["trainer bf16-base"]["heldout_loss_gap"] == pytest.approx(0.05 / 1.2)
    assert not v["trainer bf16-base"]["losses_agree"]
    # tunelab / peer within one precision; MFU against the peak of the dtype the matmuls ran in
    assert s["ratios_tunelab_over_peer"]["trainer bf16-base"]["tokens_per_s"] == pytest.approx(130 / 60)
    assert s["median"]["tunelab fp32"]["mfu"] == pytest.approx(100 * 1e6 / 1e9)
    assert s["median"]["tunelab bf16-base"]["mfu"] == pytest.approx(130 * 1e6 / 4e9)

    text = run.precision_lines({"scenarios": {"lora-58m": s}})
    lines = text.splitlines()[1:]
    assert len(lines) == 3
    assert "tunelab bf16-base" in lines[0] and "within 1 % of fp32" in lines[0] and "NOT" not in lines[0]
    assert "tok/s 1.30x" in lines[0] and "peak RSS 0.70x" in lines[0] and "over 3 steps" in lines[0]
    assert "NOT within 1 % of fp32" in lines[1] and "NOT within 1 % of fp32" in lines[2]
    table = run.table({"scenarios": {"lora-58m": {**s, "runs": runs}}})
    assert "| trainer bf16-base " in table and "| 0.46 " in table  # 60 / 130 tok/s against tunelab's bf16 base


def test_precision_flags():
    from bench import run

    errors = []
    assert run.parse_precisions(None, False, errors.append) == ["fp32"]
    assert run.parse_precisions(None, True, errors.append) == ["autocast"]
    assert run.parse_precisions("fp32, bf16-base", False, errors.append) == ["fp32", "bf16-base"]
    assert errors == []
    for bad, bf16 in (("fp16", False), ("fp32,fp32", False), ("", False), ("autocast", True)):
        run.parse_precisions(bad, bf16, errors.append)
    assert len(errors) == 4 and "fp32, autocast, bf16-base" in errors[0] and "--bf16" in errors[3]
    assert run.label("trl", "autocast", ["autocast"]) == "trl"  # one precision: the names stay the runners'
    assert {p: common.PRECISIONS[p]["base_dtype"] for p in common.PRECISIONS} == {
        "fp32": "float32", "autocast": "float32", "bf16-base": "bfloat16"}


# -- bench/serve.py: the load harness's pure parts ------------------------------------------------------------

def test_serve_percentile_is_numpy_linear_interpolation():
    import math
    import random

    import numpy as np

    from bench import serve

    rng = random.Random(3)
    for n in (1, 2, 3, 7, 32, 101):
        values = [rng.uniform(0.01, 30.0) for _ in range(n)]
        for q in (0, 5, 50, 90, 95, 99, 100):
            assert serve.percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)
    assert serve.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5  # sorts, interpolates
    assert math.isnan(serve.percentile([], 50))


def _serve_runs():
    def run(server, clients, rnd, texts, latencies, wall, **extra):
        records = [{"latency_s": t, "text": x, "finish_reason": "stop" if len(x.split()) < 4 else "length",
                    "usage_tokens": extra.get("usage")} if x is not None else {"error": "HTTP 500", "latency_s": t}
                   for x, t in zip(texts, latencies)]
        return {"server": server, "clients": clients, "round": rnd, "ok": True, "records": records, "wall_s": wall,
                "ready_s": 5.0, "server_cpu_cores": 1.5, "other_cpu_cores": 0.5, "peak_rss_mb": extra.get("rss", 500.0)}

    return [
        run("transformers", 1, 0, ["a b", "c d e f g"], [1.0, 3.0], 4.0, usage=3, rss=1000.0),
        run("tunelab", 1, 0, ["a b", "c d e f x"], [0.5, 1.5], 2.0, usage=3, rss=900.0),
        run("llama.cpp", 1, 0, ["a b", "c d e f g"], [0.25, 0.75], 1.0, rss=400.0),
        run("transformers", 1, 1, ["a b", "c d e f g"], [2.0, 4.0], 6.0, usage=3, rss=1100.0),
        run("tunelab", 1, 1, ["a b", "c d e f g"], [0.5, 0.5], 1.0, usage=3, rss=950.0),
        run("llama.cpp", 1, 1, ["a b", None], [0.25, 9.0], 1.0, rss=420.0),
        {"server": "transformers", "clients": 4, "round": 0, "ok": False, "error": "not ready after 300 s",
         "peak_rss_mb": 10.0},
        run("tunelab", 4, 0, ["a b", "c d e f g"], [1.0, 1.0], 1.0, usage=3),
    ]


def test_serve_summary_pools_rounds_counts_tokens_and_compares_replies():
    from bench import serve

    count = lambda text, finish: len(text.split()) + (finish == "stop")  # noqa: E731
    s = serve.summarize(_serve_runs(), count)
    assert list(s) == [1, 4] and list(s[1]) == ["transformers", "tunelab", "llama.cpp"]
    tf, tl, ll = s[1]["transformers"], s[1]["tunelab"], s[1]["llama.cpp"]
    # 4 answers in 10 s; tokens: "a b" stopped (2 + end of turn), "c d e f g" hit the length (5): 2 x (3 + 5)
    assert tf["requests_per_s"] == pytest.approx(0.4) and tf["tokens"] == 16 and tf["tokens_per_s"] == 1.6
    assert tf["p50_s"] == pytest.approx(2.5) and tf["p95_s"] == pytest.approx(3.85)
    assert tf["peak_rss_mb"] == 1100.0 and tf["usage_tokens"] == 12 and tf["same_as_reference"] == [4, 4]
    assert tl["same_as_reference"] == [3, 4] and tl["requests_per_s"] == pytest.approx(4 / 3)
    # a failed request is an error, not an answer; a server without usage says so
    assert ll["requests"] == 3 and ll["errors"] == 1 and ll["usage_tokens"] is None
    assert ll["same_as_reference"] == [3, 3] and ll["p95_s"] == pytest.approx(0.7)
    assert s[4]["transformers"] == {"failed": "not ready after 300 s"} and s[4]["tunelab"]["same_as_reference"] is None

    r = serve.ratios(s)
    assert list(r) == [1] and set(r[1]) == {"transformers", "llama.cpp"}  # nothing to compare with at 4 clients
    assert r[1]["transformers"]["tokens_per_s"] == pytest.approx(tl["tokens_per_s"] / 1.6)
    assert r[1]["llama.cpp"]["peak_rss_mb"] == pytest.approx(950 / 420)

    text = serve.table(s)
    lines = text.splitlines()
    assert len(lines) == 2 + 5 and lines[0].startswith("| clients | server ")
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert "| 0.40 " in lines[2] and "| 1.6 " in lines[2] and "| 1,100 MB " in lines[2] and "| 4/4 " in lines[2]
    assert "FAILED: not ready after 300 s" in lines[5]
    ratio_text = serve.ratio_table(s)
    rows = ratio_text.splitlines()[2:]
    assert len(rows) == 2 and rows[0].startswith("| 1       | tunelab / transformers |")
    assert f"| {r[1]['transformers']['tokens_per_s']:.2f}x " in rows[0]
    assert rows[1].startswith("| 1       | tunelab / llama.cpp ") and rows[1].split("|")[-2].strip() == f"{950 / 420:.2f}x"


def test_serve_ratio_table_says_why_tunelab_is_pending():
    from bench import serve

    peers_only = [r for r in _serve_runs() if r["server"] != "tunelab"]
    s = serve.summarize(peers_only, lambda text, finish: 1)
    assert serve.ratios(s) == {}
    assert serve.ratio_table(s, "`tunelab serve --help` exits 2") == \
        "tunelab / peer: pending (`tunelab serve --help` exits 2)"


def test_serve_tree_rss_counts_every_descendant():
    import subprocess

    import psutil

    from bench import serve

    # A sleeping child whose own child holds 64 MB it has written to (resident, not just reserved).
    grandchild = "import time; b = bytearray(64 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('ok', flush=True); time.sleep(120)"
    child = ("import subprocess, sys, time; g = subprocess.Popen([sys.executable, '-c', sys.argv[1]], "
             "stdout=subprocess.PIPE, text=True); g.stdout.readline(); print(g.pid, flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", child, grandchild], stdout=subprocess.PIPE, text=True)
    try:
        g = psutil.Process(int(proc.stdout.readline()))
        c = psutil.Process(proc.pid)
        own = [c.memory_info().rss / 2 ** 20, g.memory_info().rss / 2 ** 20]
        tree = serve.tree_rss_mb(proc.pid)
        # Both sleep, so their RSS stays put between the readings but for a page or so of the interpreter's own.
        assert tree == pytest.approx(sum(own), abs=1.0)
        assert own[1] > 64 and tree > own[0] + 64
        assert serve.tree_rss_mb(g.pid) == pytest.approx(own[1], abs=1.0)
    finally:
        for p in (psutil.Process(proc.pid).children(recursive=True)):
            p.kill()
        proc.kill()
        proc.wait()
    assert serve.tree_rss_mb(proc.pid) == 0.0  # gone: nothing to count, no error


# -- the 1B scenarios: the model from its config, 512-token rows, the peers' QLoRA probe, advise and the goals ------

def test_the_1b_config_counts_what_transformers_builds_without_building_it():
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench import assets

    # The config alone: Llama-3.2-1B's blocks over a 32,000-token vocabulary, untied head; the 58M as documented.
    assert common.decoder_params(assets.CONFIG_1B) == 1_104_218_112
    assert 4 * common.decoder_params(assets.CONFIG_1B) / 1e9 == pytest.approx(4.42, abs=0.005)  # float32 GB
    cfg_58m = {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
               "intermediate_size": 1376, "vocab_size": 32000, "tie_word_embeddings": False}
    assert common.decoder_params(cfg_58m) == 58_073_600
    # The same formula against real (tiny) models of that shape: grouped K/V, untied or tied, with biases.
    small = {**assets.CONFIG_1B, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8,
             "num_key_value_heads": 2, "intermediate_size": 256, "vocab_size": 300}
    for extra in ({}, {"tie_word_embeddings": True}, {"attention_bias": True, "mlp_bias": True}):
        cfg = {**small, **extra}
        model = LlamaForCausalLM(LlamaConfig(**cfg))
        built = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        assert common.decoder_params(cfg) == built, extra


def test_rows_of_one_length_and_the_variable_draw_is_unchanged(tiny_chat_llama, tmp_path, monkeypatch):
    import math
    import random

    from transformers import AutoTokenizer

    from bench import assets

    # The variable lengths are drawn as before (a rebuild gives the same files); fixed rows take the same draw.
    a, b = random.Random(7), random.Random(7)
    for _ in range(50):
        assert assets.target_length(a) == int(math.exp(b.uniform(math.log(assets.SHORTEST), math.log(512))))
    a, b = random.Random(7), random.Random(7)
    assert [assets.target_length(a, 512) for _ in range(3)] == [512] * 3
    assets.target_length(b), assets.target_length(b), assets.target_length(b)
    assert a.random() == b.random()
    with pytest.raises(ValueError, match="rows=600"):
        assets.target_length(a, 600)

    # Conversations cut to 64 tokens: each reaches the target to within a word, none passes it.
    words = "the quick brown fox jumps over a lazy dog while it rains in the city of light".split()
    rng = random.Random(1)
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    for folder, name, rows in (("dialogs", "train", [{"messages": [{"role": "user", "content": text(6)},
                                                                    {"role": "assistant", "content": text(8)}]}] * 3),
                               ("pairs", "train", [{"prompt": text(5), "chosen": text(9), "rejected": "x"}] * 3),
                               ("snippets", "train", [{"text": text(40), "label": "pos"}] * 5)):
        common.write_jsonl(tmp_path / folder / f"{name}.jsonl", rows)
    monkeypatch.setattr(assets, "DIALOGS", tmp_path / "dialogs")
    monkeypatch.setattr(assets, "PREFERENCE", tmp_path / "pairs")
    monkeypatch.setattr(assets, "SENTIMENT", tmp_path / "snippets")
    tok = AutoTokenizer.from_pretrained(str(tiny_chat_llama))
    rows = assets._conversations(6, "train", "train", 42, [tok], 64)
    lengths = [common.chat_length(tok, r["messages"]) for r in rows]
    assert len(rows) == 6 and all(56 <= n <= 64 for n in lengths), lengths


def test_qlora_counts_lora_flops_and_the_1b_scenarios_have_their_own_steps():
    from bench import assets, run

    lora = common.train_flops_per_token(assets.CONFIG_1B, "lora", 16, context=512.0)
    assert common.train_flops_per_token(assets.CONFIG_1B, "qlora", 16, context=512.0) == lora
    assert lora["adapter_params"] > 0 and lora["matmul_params"] == common.decoder_params(assets.CONFIG_1B) - (
        32000 * 2048 + 16 * 2 * 2048 + 2048)  # every weight but the embedding lookup and the norms
    assert run.scenario_steps("lora-1b", None, False) == 6 and run.scenario_steps("qlora-1b", 3, False) == 3
    assert run.scenario_steps("lora-58m", None, False) == 30 and run.scenario_steps("lora-58m", None, True) == 4
    assert run.scenario_steps("lora-1b", None, True) == 4  # --quick: 4 steps, whatever the scenario
    for name in ("lora-1b", "qlora-1b"):
        sc = run.SCENARIOS[name]
        assert sc["runners"] == ["tunelab", "trainer"] and sc["batch_size"] == 2 and sc["rows"] == 512
        assert name not in run.DEFAULT and name not in run.QUICK  # run only when named
    assert run.runner_skip("qlora-1b", "tunelab") is None and run.runner_skip("lora-1b", "trainer") is None


def test_the_peers_qlora_is_skipped_with_the_reason_where_bitsandbytes_cannot_run(tmp_path, monkeypatch):
    import types

    from bench import child, run

    monkeypatch.setattr(common, "PEER_SITE", tmp_path / "no-site")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    reason = child.probe_bitsandbytes()
    assert reason.startswith("bitsandbytes is not installed") and common.PEER_INSTALL in reason
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.SimpleNamespace(__version__="0.44.1"))
    assert "0.44.1 has no CPU backend for 4-bit" in child.probe_bitsandbytes()
    assert child.version_tuple("0.50.2") == (0, 50, 2) and child.version_tuple("0.47.0.dev0") == (0, 47, 0)
    assert child.version_tuple("0.46rc1") == (0, 46) >= child.BNB_CPU_SINCE > child.version_tuple("0.45.5")

    # The parent reads the probe's last line; a probe that crashed is a skip with its last words.
    line = child.PROBE_PREFIX + '{"reason": null}'
    assert run.probe_reason(0, f"noise\n{line}\n", "") is None
    assert run.probe_reason(0, child.PROBE_PREFIX + '{"reason": "no"}', "") == "no"
    assert run.probe_reason(1, "", "Traceback\nImportError: libfoo.so") == \
        "the bitsandbytes probe failed (exit 1): ImportError: libfoo.so"


def _median(tok_s, rss):
    return {"tokens_per_s": tok_s, "examples_per_s": tok_s / 512, "peak_rss_mb": rss, "mfu": 0.2,
            "time_to_first_step_s": 30.0, "last5_loss": 10.4, "heldout_loss": 10.4, "other_cpu_cores": 0.0,
            "settings": "s"}


def test_advise_and_goal_lines_and_a_skipped_peer_in_the_table():
    from bench import run

    results = {"scenarios": {
        "lora-1b": {"data": {"advise": {"tunelab": {"peak_mb": 7000.0, "phase": "train"}}},
                    "median": {"tunelab": _median(47.0, 7400.0), "trainer": _median(20.0, 11000.0)},
                    "runs": [{"runner": "tunelab"}, {"runner": "trainer"}]},
        "qlora-1b": {"data": {"advise": {"tunelab": {"peak_mb": 3000.0, "phase": "load"}}},
                     "median": {"tunelab": _median(30.0, 9600.0)}, "runs": [{"runner": "tunelab"}],
                     "skipped_runners": {"trainer": "bitsandbytes is not installed"}}}}
    lines = run.advise_lines(results).splitlines()
    assert "measured 7,400 MB, advise predicts 7,000 MB (train phase): 1.06x, within +-20 %" in lines[1]
    assert "3.20x, OFF by more than 20 %" in lines[2]
    goals = run.goal_lines(results).splitlines()
    assert goals[1].endswith("peak RSS 1.30x (goal <= 0.6x): NOT met")
    assert goals[2].endswith("tok/s 0.64x (goal >= 0.8x): NOT met")
    results["scenarios"]["qlora-1b"]["median"]["tunelab"] = _median(40.0, 4000.0)
    assert run.goal_lines(results).count(": met") == 2
    assert run.goal_lines({"scenarios": {"qlora-1b": results["scenarios"]["qlora-1b"]}}) == ""  # no LoRA to compare
    table = run.table(results)
    assert "| qlora-1b | trainer | skipped: bitsandbytes is not installed" in table


def test_advise_prediction_for_a_tunelab_run(tiny_chat_llama):
    from bench import run

    spec = {"model": str(tiny_chat_llama), "method": "lora", "max_length": 64, "batch_size": 2, "lora": {"r": 4},
            "device": "cpu"}
    lora = run.advise_prediction(spec, common.PRECISIONS["fp32"])
    assert lora["phase"] in ("load", "train", "eval") and lora["peak_mb"] == max(lora["phases_mb"].values())
    assert lora["parts_mb"]["runtime"] > 100  # a Python with torch: most of a tiny model's peak
    qlora = run.advise_prediction({**spec, "method": "qlora"}, common.PRECISIONS["fp32"])
    assert qlora["parts_mb"]["weights"] <= lora["parts_mb"]["weights"]


def test_the_invocation_records_one_step_count_only_where_every_scenario_ran_it():
    from bench import run

    assert run.common_steps(["lora-58m", "full-58m"], None, False) == 30
    assert run.common_steps(["lora-58m", "lora-1b"], None, False) is None  # 30 and 6: each scenario says its own
    assert run.common_steps(["lora-58m", "lora-1b"], 10, False) == 10
    assert run.common_steps(["lora-1b"], None, True) == 4
