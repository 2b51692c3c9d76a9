"""Augmentation: each operation does what it says, copies are seeded, only the training split grows."""

from __future__ import annotations

import json
import random

import pytest
from conftest import make_rows, write_jsonl

import tunelab
from tunelab import config
from tunelab.data import augment

TEXT = "the film was really great and the cast was charming"


def test_each_operation(tiny_bert):
    rng = random.Random(0)
    words = TEXT.split()
    deleted = augment.alter(TEXT, "delete", 0.2, rng, None).split()
    assert len(deleted) == len(words) - 2 and all(w in words for w in deleted)
    swapped = augment.alter(TEXT, "swap", 0.1, rng, None).split()
    assert sorted(swapped) == sorted(words) and swapped != words
    inserted = augment.alter(TEXT, "insert", 0.1, rng, None).split()
    assert len(inserted) == len(words) + 1 and set(inserted) == set(words)


def test_synonyms_are_embedding_neighbours(tiny_bert):
    from transformers import AutoModel, AutoTokenizer

    model, tok = AutoModel.from_pretrained(tiny_bert), AutoTokenizer.from_pretrained(tiny_bert)
    neighbours = augment.EmbeddingNeighbours(model, tok)
    near = neighbours("great")
    assert near and "great" not in near and all(w.isalpha() and len(w) >= 3 for w in near)
    out = augment.alter("great film", "synonym", 0.5, random.Random(1), neighbours)
    assert out != "great film" and len(out.split()) == 2


def test_augmentation_is_seeded_counted_and_touches_train_only(tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(60, seed=1))
    test = write_jsonl(tmp_path / "test.jsonl", make_rows(20, seed=2))
    args = [f"model.path={tiny_bert}", f"data.train={train}", f"data.test={test}", "data.augment_copies=2",
            "train.max_steps=1", "eval.linear_probe=false"]
    a = tunelab.train(None, args + [f"output_dir={tmp_path / 'a'}"])
    b = tunelab.train(None, args + [f"output_dir={tmp_path / 'b'}"])
    ra = json.loads((a.dir / "data_report.json").read_text())
    rb = json.loads((b.dir / "data_report.json").read_text())
    aug = ra["splits"]["train"]["augmented"]
    assert aug == rb["splits"]["train"]["augmented"] and aug["added"] > 0
    kept = ra["splits"]["train"]["rows"]
    assert ra["splits"]["train"]["tokens"]["examples"] == kept + aug["added"]
    assert ra["splits"]["validation"]["tokens"]["examples"] == ra["splits"]["validation"]["rows"]
    assert ra["splits"]["test"]["tokens"]["examples"] == ra["splits"]["test"]["rows"]


def test_augmentation_is_refused_for_other_tasks():
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="augment_copies applies to task.type classification"):
        config.validate({"model": {"path": "m"}, "data": {"train": "x", "augment_copies": 1}, "task": {"type": "sft"}})
