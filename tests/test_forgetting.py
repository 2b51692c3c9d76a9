"""The forgetting probe (eval.forgetting): perplexity on general text for causal LMs, linear-probe accuracy on a
second labelled task for any model; measured on the base before the method and on the tuned model after."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import forward_ops, make_chat_rows, make_rows, size, tol, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunelab
from tunelab import TunelabError, tasks
from tunelab.evaluate import forgetting

POOLS = {"praise": ["great", "superb", "charming"], "scorn": ["awful", "tedious", "bland"], "plain": ["plot", "cast", "script"]}


def _topic_rows(n: int) -> list[dict]:
    """A second task in the tiny BERT's vocabulary (which word pool a text draws from), with a fifth of the labels
    shuffled so that no probe is perfect and a changed body shows in its accuracy."""
    import random

    rng, names, rows = random.Random(5), list(POOLS), []
    for i in range(n):
        label = names[i % 3]
        words = rng.sample(["the", "film", "was", "really", "quite", "and"], 3) + [rng.choice(POOLS[label])]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": rng.choice(names) if rng.random() < 0.2 else label})
    return rows


def _classify(tmp_path, tiny_bert, *extra):
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(160, seed=1))
    return tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={train}", "eval.linear_probe=false",
                                "train.batch_size=16", f"output_dir={tmp_path / 'run'}", *extra])


def test_a_labelled_probe_is_measured_before_and_after_on_the_same_halves(tmp_path, tiny_bert):
    probe_file = write_jsonl(tmp_path / "topics.jsonl", _topic_rows(90))
    run = _classify(tmp_path, tiny_bert, f"eval.forgetting={probe_file}", "method.name=full", "train.lr=5e-3",
                    "train.max_steps=25")
    result = run.summary["forgetting"]
    assert result["kind"] == "probe" and result["metric"] == "accuracy" and result["file"] == str(probe_file)
    # "before" is the base model's figure: measuring a freshly loaded base gives it again.
    probe = forgetting.load(str(probe_file), tasks.get("classification"), "classification", 42)
    model, tok = tunelab.tasks.get("classification").build_model(
        tunelab.config.ModelConfig(path=str(tiny_bert)), {"labels": ["neg", "pos"]})
    assert forgetting.measure(probe, model, tok, "cpu", 128, 64) == result["before"]  # the same weights and kernels
    assert 0 <= result["after"] <= 1 and result["change"] == pytest.approx(result["after"] - result["before"])
    # The tuned figure is the saved tuned model's, and 25 full-FT steps at a high LR on another task moved it.
    tuned = tunelab.load(run.dir)
    assert forgetting.measure(probe, tuned.model, tuned.tokenizer, "cpu", 128, 64) == result["after"]  # likewise
    assert result["after"] != result["before"]


def test_the_labelled_probe_halves_are_stratified_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "topics.jsonl", _topic_rows(60))
    probe = forgetting.load(str(path), tasks.get("classification"), "classification", 0)
    for label in POOLS:  # every label split in two halves (within one row)
        fit, score = (sum(r["label"] == label for r in probe[h]) for h in ("fit", "score"))
        assert fit > 0 and score > 0 and abs(fit - score) <= 1
    assert sorted(map(str, probe["fit"] + probe["score"])) == sorted(map(str, _topic_rows(60)))


def test_causal_runs_default_to_the_shipped_general_text_and_report_its_perplexity(tmp_path, tiny_chat_llama):
    train = write_jsonl(tmp_path / "train.jsonl", make_chat_rows(120, seed=3))
    run = tunelab.train(None, [f"model.path={tiny_chat_llama}", f"data.train={train}", "task.type=sft",
                               "data.dedupe=false", "data.max_length=64", "train.batch_size=8", "train.lr=1e-2",
                               "method.name=full", "train.max_steps=8", "eval.samples=0", f"output_dir={tmp_path / 'r'}"])
    result = run.summary["forgetting"]
    assert result["kind"] == "perplexity" and result["file"].endswith("general_text.txt")
    assert len(forgetting.default_text().read_text().splitlines()) >= 300

    # The "before" figure is the base model's perplexity on those passages, computed here by hand.
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_llama).eval()
    tok = AutoTokenizer.from_pretrained(tiny_chat_llama)
    nll, count, biggest = 0.0, 0, 0.0
    with torch.no_grad():
        for line in forgetting.default_text().read_text().splitlines():
            if not line.strip():
                continue
            # every passage ends with EOS and is cut into windows of data.max_length tokens, as causal_lm text
            ids = tok(line.strip())["input_ids"] + [tok.eos_token_id]
            for window in (ids[i : i + 64] for i in range(0, len(ids), 64)):
                if len(window) < 2:
                    continue
                logits = model(input_ids=torch.tensor([window])).logits[0, :-1]
                nll += torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum").item()
                count += len(window) - 1
                biggest = max(biggest, size(logits))
    # Each token's NLL rounds like a forward pass over its window and a log-softmax over the vocabulary, of terms up
    # to 2 max |logit| + log(vocab); the mean of `count` such independent roundings, 1 / sqrt(count) as much; exp
    # turns that absolute error of the mean into a relative one of the perplexity.
    vocab = logits.shape[-1]
    per_token = tol(2 * biggest + math.log(vocab), forward_ops(32, 64, 2, tokens=64) + vocab)
    assert result["before"] == pytest.approx(math.exp(nll / count), rel=per_token / math.sqrt(count))
    assert result["after"] != pytest.approx(result["before"], rel=1e-3)


def test_other_tasks_have_no_default_probe(tmp_path, tiny_bert):
    run = _classify(tmp_path, tiny_bert, "train.max_steps=2")
    assert "forgetting" not in run.summary


def test_an_unlabelled_probe_on_an_encoder_task_is_refused_before_any_run_dir(tmp_path, tiny_bert):
    (tmp_path / "general.txt").write_text("\n".join(f"line number {i} of some text" for i in range(30)))
    with pytest.raises(TunelabError, match=r"eval.forgetting: .*general.txt.* no label column.*perplexity.*labelled file"):
        _classify(tmp_path, tiny_bert, f"eval.forgetting={tmp_path / 'general.txt'}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("rows, message", [
    ([{"text": f"t {i}", "label": "a"} for i in range(30)], "single label"),
    ([{"text": f"t {i}", "label": "a" if i % 2 else "b"} for i in range(5)], "at least 20"),
    ([{"sentence": f"t {i}"} for i in range(30)], "needs a 'text' column.*found sentence"),
])
def test_bad_probe_files_get_clear_messages(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "probe.jsonl", rows)
    with pytest.raises(TunelabError, match=f"eval.forgetting: .*{message}"):
        forgetting.load(str(path), tasks.get("classification"), "classification", 0)


def test_a_missing_probe_file_names_the_key(tmp_path):
    with pytest.raises(TunelabError, match="eval.forgetting"):
        forgetting.load(str(tmp_path / "nope.txt"), tasks.get("sft"), "sft", 0)
