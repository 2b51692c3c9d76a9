"""Model cards (report/card.py): README.md beside every run's artifact and in every export, read back with
huggingface_hub's own ModelCard parser: the metadata it finds, the figures against summary.json, the load snippets."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import PROBS_TOL, make_chat_rows, make_rows, write_jsonl
from huggingface_hub import ModelCard
from test_datasets_source import _sentiment_splits, hf, publish  # noqa: F401  (hf: the fixture)
from test_embedding import pairs

import tunelab
from tunelab import export
from tunelab.report import card

TEXTS = ["great film and a charming cast", "a dull , tedious plot"]


def _train(tmp_path, model_path, *extra, name="run", rows=None):
    train = write_jsonl(tmp_path / f"{name}-train.jsonl", rows or make_rows(80, seed=6))
    return tunelab.train(None, [f"model.path={model_path}", f"data.train={train}", "train.max_steps=2",
                               "eval.forgetting=none", *extra, f"output_dir={tmp_path / name}"])


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "examples" and isinstance(v, (int, float))}


def _check(path, *, library, pipeline, tags, figures, split, base_model=None, datasets=None):
    """The card at `path` parses, says what it should, and its model-index holds exactly `figures` on `split`."""
    loaded = ModelCard.load(path)
    data = loaded.data.to_dict()
    assert data.get("library_name") == library and data.get("pipeline_tag") == pipeline
    assert set(tags) <= set(data["tags"]) and "tunelab" in data["tags"]
    assert data.get("base_model") == base_model and data.get("datasets") == datasets
    results = loaded.data.eval_results
    assert {r.metric_type: r.metric_value for r in results} == _scalars(figures)
    assert {(r.task_type, r.dataset_split) for r in results} == {(pipeline, split)}
    # the parsed metadata survives a round trip through the Hub's own writer, as a push would do it
    assert ModelCard(loaded.content).data.to_dict() == data
    return loaded


def _snippet(text: str, first_line: str) -> str:
    """The python block of the card that starts with `first_line`."""
    return next(b for b in re.findall(r"```python\n(.*?)\n```", text, re.S) if b.startswith(first_line))


def test_classification_lora_run_and_its_exports(tiny_bert, tmp_path):
    test = write_jsonl(tmp_path / "test.jsonl", make_rows(40, seed=7))
    run = _train(tmp_path, tiny_bert, "method.name=lora", "method.r=4", f"data.test={test}")
    loaded = _check(run.dir / "adapter" / "README.md", library="peft", pipeline="text-classification",
                    tags=["lora", "classification"], figures=run.summary["test"], split="test")
    text = loaded.content
    assert "## What was trained" in text and f"{run.summary['trainable_params']:,}" in text
    # the data report in brief: rows read and kept per split, and the base / probe / tuned figures
    assert "| test | test.jsonl | 40 | 40 | none |" in text
    assert "| accuracy | " + " | ".join(f"{run.summary[k]['test']['accuracy']:.4g}" for k in ("base", "linear_probe")) \
        + f" | {run.summary['test']['accuracy']:.4g} |" in text
    assert "| method.r | 4 |" in text and "config.yaml" in text
    # the peft snippet loads the adapter on the base as written, and predicts as tunelab does
    scope = {}
    exec(_snippet(text, "from peft import"), scope)  # noqa: S102  (the card's own snippet, on the test's files)
    with torch.no_grad():
        probs = scope["model"].eval()(**scope["tokenizer"](TEXTS, padding=True, return_tensors="pt")).logits.softmax(-1)
    ours = tunelab.load(run.dir).predict(TEXTS)
    expected = torch.tensor([[p["probs"]["neg"], p["probs"]["pos"]] for p in ours])
    torch.testing.assert_close(probs, expected, atol=PROBS_TOL, rtol=0)
    scope = {}
    exec(_snippet(text, "import tunelab"), scope)  # noqa: S102
    assert scope["model"].predict(TEXTS) == ours

    # exports: the adapter as saved keeps library peft and names its own folder; merged is a transformers model
    peft_out = export.run(run.dir, tmp_path / "peft")
    peft_card = _check(peft_out / "README.md", library="peft", pipeline="text-classification", tags=["lora"],
                       figures=run.summary["test"], split="test")
    assert repr(str(peft_out.resolve())) in _snippet(peft_card.content, "from peft import")
    merged = export.run(run.dir, tmp_path / "merged", merge=True)
    merged_card = _check(merged / "README.md", library="transformers", pipeline="text-classification",
                         tags=["lora"], figures=run.summary["test"], split="test")
    scope = {}
    exec(_snippet(merged_card.content, "from transformers import"), scope)  # noqa: S102
    with torch.no_grad():
        probs = scope["model"].eval()(**scope["tokenizer"](TEXTS, padding=True, return_tensors="pt")).logits.softmax(-1)
    torch.testing.assert_close(probs, expected, atol=PROBS_TOL, rtol=0)


def test_full_fine_tune_without_a_test_split_reports_validation(tiny_bert, tmp_path):
    run = _train(tmp_path, tiny_bert, "method.name=full", "eval.linear_probe=false")
    loaded = _check(run.dir / "model" / "README.md", library="transformers", pipeline="text-classification",
                    tags=["full", "classification"], figures=run.summary["eval"], split="validation")
    assert "linear probe" not in loaded.content  # not measured, so not on the card
    assert "from transformers import AutoModelForSequenceClassification" in loaded.content


def test_sft_run(tiny_chat_llama, tmp_path):
    run = _train(tmp_path, tiny_chat_llama, "task.type=sft", "method.name=lora", "data.dedupe=false", "data.max_length=64",
                 "eval.samples=1", "eval.max_new_tokens=4", rows=make_chat_rows(40, seed=3))
    loaded = _check(run.dir / "adapter" / "README.md", library="peft", pipeline="text-generation",
                    tags=["lora", "sft"], figures=run.summary["eval"], split="validation")
    assert "AutoModelForCausalLM" in _snippet(loaded.content, "from peft import")


def test_embedding_run_exported_as_sentence_transformers(tiny_bert, tmp_path):
    from sentence_transformers import SentenceTransformer

    train = write_jsonl(tmp_path / "pairs.jsonl", pairs(60, seed=1))
    run = tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={train}", "task.type=embedding",
                               "method.name=lora", "method.r=4", "train.max_steps=2", "train.batch_size=8",
                               "eval.forgetting=none", f"output_dir={tmp_path / 'run'}"])
    _check(run.dir / "adapter" / "README.md", library="peft", pipeline="sentence-similarity",
           tags=["embedding"], figures=run.summary["eval"], split="validation")
    out = export.run(run.dir, tmp_path / "st", fmt="sentence-transformers")
    loaded = _check(out / "README.md", library="sentence-transformers", pipeline="sentence-similarity",
                    tags=["embedding"], figures=run.summary["eval"], split="validation")
    scope = {}
    exec(_snippet(loaded.content, "from sentence_transformers import"), scope)  # noqa: S102
    assert isinstance(scope["model"], SentenceTransformer) and scope["vectors"].shape == (1, 32)


def test_a_run_by_hub_id_on_a_hub_dataset_names_both(hf, tiny_bert, tmp_path):  # noqa: F811  (hf: the fixture)
    hf.commit("org/tiny-bert", tiny_bert)
    publish(hf, "org/reviews", _sentiment_splits(), tmp_path / "repo")
    run = tunelab.train(None, ["model.path=org/tiny-bert", "data.train=hf://org/reviews", "data.test=hf://org/reviews",
                               "method.name=lora", "train.max_steps=2", "eval.linear_probe=false", "model.device=cpu",
                               f"output_dir={tmp_path / 'run'}"])
    versions = json.loads((run.dir / "versions.json").read_text())
    loaded = _check(run.dir / "adapter" / "README.md", library="peft", pipeline="text-classification",
                    tags=["lora"], figures=run.summary["test"], split="test", base_model="org/tiny-bert",
                    datasets=["org/reviews"])
    assert {(r.dataset_type, r.dataset_revision) for r in loaded.data.eval_results} == {
        ("org/reviews", versions["hub_datasets"]["data.test"]["commit"])}
    snippet = _snippet(loaded.content, "from peft import")
    assert f"from_pretrained('org/tiny-bert', revision={versions['hub_model']['commit']!r}" in snippet
    assert versions["hub_model"]["commit"] in loaded.content  # "Base model: org/tiny-bert at commit ..."


def test_base_model_of_a_local_folder_is_its_recorded_hub_id_or_nothing(tiny_bert, tmp_path):
    cfg = tunelab.config.load(None, [f"model.path={tiny_bert}", "data.train=x.jsonl"])
    assert card.base_model(cfg, {}) == (None, None)  # a local save records its own path, which is no Hub id
    folder = tmp_path / "local"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "HuggingFaceTB/SmolLM2-135M"}))
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": str(folder)})})
    assert card.base_model(cfg, {}) == ("HuggingFaceTB/SmolLM2-135M", None)
    assert card.base_model(cfg, {"hub_model": {"id": "org/m", "commit": "a" * 40}}) == ("org/m", "a" * 40)


@pytest.mark.parametrize("summary", [{}, {"eval": {"accuracy": float("nan")}}])
def test_figures_a_run_did_not_measure_are_left_out(summary, tiny_bert):
    cfg = tunelab.config.load(None, [f"model.path={tiny_bert}", "data.train=x.jsonl"])
    text = card.render(cfg, summary, None, {}, library="peft", name="run", load="")
    data = ModelCard(text).data.to_dict()
    assert "model-index" not in data and "## Results" not in text and "## Data" not in text


def test_a_multitask_run_has_a_card_per_adapter_with_each_task_s_figures(tiny_bert, tmp_path):
    from test_multitask import _recipe

    from tunelab import pipeline

    run = pipeline.train(_recipe(tmp_path, tiny_bert, "lora", multitask__adapters="per_task",
                                 train__max_steps=2))
    for name in ("sentiment", "topic"):
        loaded = ModelCard.load(run.dir / "adapters" / name / "README.md")
        data = loaded.data.to_dict()
        assert data["pipeline_tag"] == "text-classification" and {"multitask", "lora"} <= set(data["tags"])
        found = {(r.task_name, r.dataset_split, r.metric_type): r.metric_value for r in loaded.data.eval_results}
        assert found == {(n, "validation", m): v for n in ("sentiment", "topic")
                         for m, v in _scalars(run.summary["eval"][n]).items()}
        assert repr(str(run.dir / "adapters" / name)) in loaded.content


def test_a_grpo_run_reports_its_validation_reward(tiny_chat_llama, tmp_path):
    from test_grpo import _prompt_file

    (tmp_path / "length.py").write_text("def length(prompts, completions):\n    return [len(c) for c in completions]\n")
    run = tunelab.train(None, [f"model.path={tiny_chat_llama}", f"data.train={_prompt_file(tmp_path, 8)}",
                               "task.type=grpo", f"task.reward_function={tmp_path / 'length.py'}:length",
                               "method.name=full", "train.max_steps=1", "train.batch_size=2",
                               "eval.max_new_tokens=2", f"output_dir={tmp_path / 'rl'}"])
    loaded = ModelCard.load(run.dir / "model" / "README.md")
    assert loaded.data.to_dict()["pipeline_tag"] == "text-generation" and "grpo" in loaded.data.tags
    assert [(r.metric_type, r.metric_value) for r in loaded.data.eval_results] == [("reward", run.summary["eval"]["reward"])]


def test_a_replacing_run_s_card_names_the_folder_it_ends_up_in(tiny_bert, tmp_path):
    first = _train(tmp_path, tiny_bert, "method.name=lora")
    args = [f"model.path={tiny_bert}", f"data.train={tmp_path / 'run-train.jsonl'}", "train.max_steps=1",
            "method.name=lora", f"output_dir={first.dir}"]
    run = tunelab.train(None, args, overwrite=True)  # written beside the old run, then swapped in
    assert run.dir == first.dir and run.summary["steps"] == 1
    text = (run.dir / "adapter" / "README.md").read_text()
    assert ".tunelab-new" not in text and repr(str(run.dir / "adapter")) in text


def test_generated_reply_scores_and_forgetting_are_in_the_body(tiny_bert):
    cfg = tunelab.config.load(None, [f"model.path={tiny_bert}", "data.train=x.jsonl"])
    summary = {"eval": {"loss": 2.5}, "generation": {"base": {"validation": {"rougeL": 0.125, "examples": 4}},
                                                     "tuned": {"validation": {"rougeL": 0.375, "examples": 4}}},
               "forgetting": {"kind": "perplexity", "metric": "perplexity", "file": "/x/general.txt", "before": 12.5,
                              "after": 13.25, "change": 0.75}}
    text = card.render(cfg, summary, None, {}, library="peft", name="run", load="")
    assert "| rougeL | 0.125 | 0.375 |" in text and "examples" not in text.split("Generated replies")[1]
    assert "perplexity 12.5 before training, 13.25 after" in text and "general.txt" in text
