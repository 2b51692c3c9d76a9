"""Every method trains each encoder task of the regression / multi-label / pair family for a step, through the whole
pipeline (prepare, loop, evaluation, save, reload and predict), on the tiny BERT."""

from __future__ import annotations

import pytest
from conftest import make_rows, write_jsonl

import tunelab
from tunelab import methods

TASKS = {
    "regression": lambda rows: [{"text": r["text"], "label": (1.5 if r["label"] == "pos" else -2.0) + i % 3}
                                for i, r in enumerate(rows)],
    "multilabel": lambda rows: [{"text": r["text"], "label": [r["label"]] + (["long"] if len(r["text"]) > 30 else [])}
                                for r in rows],
    "pairs": lambda rows: [{"text": r["text"], "pair": rows[i - 1]["text"], "label": r["label"]}
                           for i, r in enumerate(rows)],
}


@pytest.mark.parametrize("method", sorted(methods.METHODS))
@pytest.mark.parametrize("kind", sorted(TASKS))
def test_every_method_runs_a_step_of_each_encoder_task(kind, method, tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", TASKS[kind](make_rows(48, seed=1)))
    task = {"regression": "regression", "multilabel": "multilabel", "pairs": "classification"}[kind]
    extra = {"freeze": ["method.freeze_layers=1"], "lora": ["method.r=4"], "dora": ["method.r=4"],
             "qlora": ["method.r=4"]}.get(method, [])
    run = tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={train}", f"task.type={task}",
                               f"method.name={method}", *extra, "train.max_steps=1", "train.batch_size=8",
                               "eval.samples=2", "eval.forgetting=none",
                               *(["data.text_pair_field=pair"] if kind == "pairs" else []),
                               f"output_dir={tmp_path / 'run'}"])
    assert run.summary["steps"] == 1
    model = tunelab.load(run.dir)
    pred = model.predict(["the film was great"], pairs=["a dull plot"] if kind == "pairs" else None)[0]
    assert {"regression": "score", "multilabel": "labels", "pairs": "label"}[kind] in pred
