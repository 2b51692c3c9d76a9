"""Hugging Face `datasets` as data sources (data/hub.py): a Hub dataset id (hf://org/name), a save_to_disk folder and
an in-memory Dataset / DatasetDict given to tunelab.train(data=...). Every task reads them through the same readers
as files, so a dataset holding a file's rows gives the same rows, split and report (rows named by their index in
the split); the Hub is the loopback server of tests/hub_server.py, so the real `datasets` download code runs."""

from __future__ import annotations

import gc
import json
import random
import re
import shutil
import sys
from pathlib import Path

import datasets
import pytest
import torch
from conftest import make_chat_rows, make_rows, write_jsonl
from hub_server import set_offline
from safetensors.torch import load_file

import tunelab
from tunelab import config, data, tasks
from tunelab.data import hub as data_hub
from tunelab.data import stream
from tunelab.errors import TunelabError

SENTIMENT = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})


# -- rows every task reads ---------------------------------------------------------------------------------------

def _rows(task: str, n: int = 60, seed: int = 0) -> list[dict]:
    """n rows of `task`'s layout, a few of them repeated (so dedupe has work) and none malformed."""
    rng = random.Random(seed)
    base = make_rows(n, seed)
    if task in ("classification", "mlm", "causal_lm"):
        out = [{"text": r["text"], "label": r["label"]} for r in base]
    elif task == "pairs":
        out = [{"text": r["text"], "text2": base[-1 - i]["text"], "label": r["label"]} for i, r in enumerate(base)]
    elif task == "regression":
        out = [{"text": r["text"], "label": float(len(r["text"]) % 7)} for r in base]
    elif task == "multilabel":
        out = [{"text": r["text"], "label": sorted({r["label"], rng.choice(["long", "short"])})} for r in base]
    elif task == "embedding":
        out = [{"anchor": r["text"], "positive": r["text"].upper()} for r in base]
    elif task == "sft":
        out = make_chat_rows(n, seed)
    elif task in ("dpo", "reward"):
        out = [{"prompt": f"say {i}: {r['text']}", "chosen": "thanks kindly", "rejected": "go away"}
               for i, r in enumerate(base)]
    elif task == "token_classification":
        out = []
        for r in base:
            words = r["text"].split()
            out.append({"tokens": words, "tags": ["B-CUE" if w in ("great", "awful") else "O" for w in words]})
    elif task == "qa":
        out = []
        for i, r in enumerate(base):
            context = f"In review {i % 20}: {r['text']}."
            word = r["text"].split()[0]
            out.append({"id": f"q{i}", "question": f"Which word opens review {i % 20}?", "context": context,
                        "answers": {"text": [word], "answer_start": [context.index(word, len(f'In review {i % 20}: '))]}})
    return out + out[:3]  # repeats


TASKS = {  # task -> (task.type, extra overrides)
    "classification": ("classification", []),
    "pairs": ("classification", ["data.text_pair_field=text2"]),
    "regression": ("regression", []),
    "multilabel": ("multilabel", []),
    "embedding": ("embedding", []),
    "mlm": ("mlm", []),
    "causal_lm": ("causal_lm", []),
    "sft": ("sft", []),
    "token_classification": ("token_classification", []),
    "qa": ("qa", []),
    "reward": ("reward", []),
    "dpo": ("dpo", []),
}


def _cfg(task: str, train, *extra: str):
    kind, more = TASKS[task]
    return config.load(None, ["model.path=unused", f"task.type={kind}", f"data.train={train}", *more, *extra])


def _without_rows(splits: dict) -> dict:
    return {name: [{k: v for k, v in r.items() if k not in ("row", "where")} for r in rows]
            for name, rows in splits.items()}


def _report_body(report: dict) -> dict:
    """The report less what names the source (files, dataset, the format's 'jsonl'/'dataset' prefix)."""
    out = {"split": report["split"], "splits": {}}
    for name, entry in report["splits"].items():
        entry = {k: v for k, v in entry.items() if k not in ("dataset", "format")}
        out["splits"][name] = entry
    return out


def _sources(rows: list[dict], tmp_path: Path, features=None) -> dict:
    """The same rows as a JSONL file, an in-memory Dataset (kept by `hold`, as tunelab.train does) and a
    save_to_disk DatasetDict folder."""
    ds = datasets.Dataset.from_list(rows, features=features)
    ds.save_to_disk(str(tmp_path / "one"))  # to check a single saved Dataset too
    datasets.DatasetDict(train=ds).save_to_disk(str(tmp_path / "dict"))
    return {"file": write_jsonl(tmp_path / "train.jsonl", rows), "memory": data_hub.hold(ds), "_keep": ds,
            "disk": tmp_path / "dict", "disk-single": tmp_path / "one"}


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_reads_a_dataset_as_it_reads_the_same_rows_from_a_file(task, tmp_path):
    """Same rows after cleaning, same seeded validation split, same data report; a dataset's row is its index (the
    JSONL line minus one)."""
    rows = _rows(task)
    sources = _sources(rows, tmp_path)
    spec = tasks.get(TASKS[task][0])
    want, want_report = spec.load_splits(_cfg(task, sources["file"]), 3)
    assert sum(sum(e.get("dropped", {}).values()) for e in want_report["splits"].values()) >= 1  # dedupe ran
    for name in ("memory", "disk", "disk-single"):
        got, report = spec.load_splits(_cfg(task, sources[name]), 3)
        assert _without_rows(got) == _without_rows(want), name
        assert _report_body(report) == _report_body(want_report), name
        for split in got:
            assert [r["row"] for r in got[split]] == [r["row"] - 1 for r in want[split]]
        origin = report["splits"]["train"]["dataset"]
        assert origin["kind"] == name.split("-")[0] and origin["rows"] == len(rows)
        assert origin["split"] == (None if name != "disk" else "train")


def test_class_label_columns_read_as_their_names_and_minus_one_as_no_label(tmp_path):
    rows = [{"text": f"text {i}", "label": i % 2} for i in range(10)] + [{"text": "unlabelled", "label": -1}]
    ds = datasets.Dataset.from_list(rows, features=SENTIMENT)
    splits, report = data.load_splits(_cfg("classification", data_hub.hold(ds), "data.val_fraction=0.2").data, 0)
    assert {r["label"] for r in splits["train"] + splits["validation"]} == {"neg", "pos"}
    assert report["splits"]["train"]["dropped"]["missing_label"] == 1
    ner = datasets.Dataset.from_list([{"tokens": ["Ada", "visited", "Paris"], "ner_tags": [1, 0, 2]}] * 2 +
                                     [{"tokens": ["Bob", "ran"], "ner_tags": [1, 0]}] * 2,
                                     features=datasets.Features({"tokens": datasets.List(datasets.Value("string")),
                                                                 "ner_tags": datasets.List(datasets.ClassLabel(
                                                                     names=["O", "B-PER", "B-LOC"]))}))
    cfg = _cfg("token_classification", data_hub.hold(ner), "data.tags_field=ner_tags", "data.dedupe=false")
    splits, _ = tasks.get("token_classification").load_splits(cfg, 0)
    assert sorted(tuple(r["tags"]) for r in splits["train"] + splits["validation"]) == \
        [("B-PER", "O"), ("B-PER", "O"), ("B-PER", "O", "B-LOC"), ("B-PER", "O", "B-LOC")]
    with pytest.raises(TunelabError, match=r"row 0: 'tokens' and 'tags' must both be lists .*set data.tags_field"):
        tasks.get("token_classification").load_splits(_cfg("token_classification", data_hub.hold(ner)), 0)


# -- errors name the row by its index and the key to fix ----------------------------------------------------------

BAD_ROWS = {  # task -> (rows with one bad row at index 17, message)
    "regression": (lambda rows: [{**r, "label": str(r["label"])} for r in rows[:17]] + [{"text": "odd", "label": "lots"}]
                   + [{**r, "label": str(r["label"])} for r in rows[18:]],
                   r"Dataset '<in-memory Dataset, 63 rows, sha256 [0-9a-f]{16}>' \(data\.train\) row 17 has 'lots' in "
                   r"'label', which is not a finite number"),
    "sft": (lambda rows: rows[:17] + [{"messages": [{"role": "user", "content": "hi"}]}] + rows[18:],
            r"\(data\.train\) row 17: ends with a user turn that has no assistant reply"),
    "dpo": (lambda rows: rows[:17] + [{"prompt": "p", "chosen": "same", "rejected": "same"}] + rows[18:],
            r"\(data\.train\) row 17: 'chosen' and 'rejected' are the same reply"),
    "embedding": (lambda rows: rows[:17] + [{"anchor": "q", "positive": " "}] + rows[18:],
                  r"\(data\.train\) row 17: 'positive' \(positive\) is empty"),
}


@pytest.mark.parametrize("task", list(BAD_ROWS))
def test_a_bad_row_is_named_by_its_index_in_the_split(task, tmp_path):
    change, message = BAD_ROWS[task]
    rows = change(_rows(task))
    ds = datasets.Dataset.from_list(rows)
    with pytest.raises(TunelabError, match=message):
        tasks.get(TASKS[task][0]).load_splits(_cfg(task, data_hub.hold(ds)), 0)
    datasets.DatasetDict(train=ds).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(TunelabError, match=rf"Dataset '{tmp_path / 'saved'}' split 'train' \(data\.train\) row 17"):
        tasks.get(TASKS[task][0]).load_splits(_cfg(task, tmp_path / "saved"), 0)


def test_a_missing_column_names_the_columns_found_and_the_key(tmp_path):
    ds = datasets.Dataset.from_list([{"sentence": "good", "label": 1}, {"sentence": "bad", "label": 0}])
    with pytest.raises(TunelabError, match=r"has no 'text' column in the dataset; columns found: 'sentence', 'label'\. "
                                           r"Set data\.text_field to the column that holds the text"):
        data.load_splits(_cfg("classification", data_hub.hold(ds)).data, 0)


def test_a_dataset_dict_reads_the_split_its_key_names_or_lists_them(tmp_path):
    rows = [{"text": f"text {i}", "label": "ab"[i % 2]} for i in range(40)]
    saved = tmp_path / "saved"
    datasets.DatasetDict(train=datasets.Dataset.from_list(rows[:30]), dev=datasets.Dataset.from_list(rows[30:]),
                         ).save_to_disk(str(saved))
    cfg = _cfg("classification", saved, f"data.validation={saved}", "data.validation_split=dev")
    splits, report = data.load_splits(cfg.data, 0)
    assert [r["text"] for r in splits["validation"]] == [r["text"] for r in rows[30:]]
    assert report["split"]["method"] == "file" and report["splits"]["validation"]["dataset"]["split"] == "dev"
    with pytest.raises(TunelabError, match=r"has no split 'validation'; its splits: 'train', 'dev'\. Set "
                                           r"data\.validation_split to one of them"):
        data.load_splits(_cfg("classification", saved, f"data.validation={saved}").data, 0)


def test_without_the_datasets_extra_a_dataset_source_names_the_extra(tmp_path, monkeypatch):
    datasets.Dataset.from_list([{"text": "a", "label": "x"}]).save_to_disk(str(tmp_path / "saved"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # what `import datasets` meets when it is not installed
    for source in ("hf://org/reviews", tmp_path / "saved"):
        with pytest.raises(TunelabError, match=r"needs the `datasets` package, which tunelab installs only as an "
                                               r"extra: pip install 'tunelab\[datasets\]'"):
            data.load_splits(_cfg("classification", source).data, 0)


def test_a_directory_that_is_no_saved_dataset_says_what_it_should_be(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(TunelabError, match="is not a file .* or at a folder written by a Hugging Face dataset's "
                                           "save_to_disk"):
        data.load_splits(_cfg("classification", tmp_path / "folder").data, 0)


# -- the Hub, served by tests/hub_server.py ---------------------------------------------------------------------

@pytest.fixture
def hf(hub, tmp_path, monkeypatch):
    """The `hub` server, and `datasets` pointed at it and at a cache in tmp_path: `datasets` reads its settings once,
    at import, like huggingface_hub (which the hub fixture patches), so they are patched here too."""
    home = tmp_path / "hf-home"
    cache = home / "datasets"
    for key, value in {"HF_ENDPOINT": hub.url, "HUB_DATASETS_URL": hub.url + "/datasets/{repo_id}/resolve/{revision}/{path}",
                       "HF_CACHE_HOME": str(home), "HF_DATASETS_CACHE": cache, "HF_MODULES_CACHE": home / "modules",
                       "DOWNLOADED_DATASETS_PATH": cache / "downloads",
                       "EXTRACTED_DATASETS_PATH": cache / "downloads" / "extracted",
                       "HF_HUB_OFFLINE": False, "HF_UPDATE_DOWNLOAD_COUNTS": False}.items():
        monkeypatch.setattr(datasets.config, key, value)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    return hub


def offline(monkeypatch, on: bool) -> None:
    set_offline(monkeypatch, on)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", on)


def publish(server, repo: str, splits: dict, folder: Path, configs: dict | None = None) -> str:
    """Commit DatasetDict-like {split: Dataset} as the Hub's parquet layout (data/{split}-00000-of-00001.parquet, or one
    folder per config with a README naming them); the commit id."""
    shutil.rmtree(folder, ignore_errors=True)
    if configs is None:
        for split, ds in splits.items():
            ds.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    else:
        card = ["---", "configs:"]
        for name, parts in configs.items():
            card += [f"- config_name: {name}", "  data_files:"]
            for split, ds in parts.items():
                ds.to_parquet(str(folder / name / f"{split}-00000-of-00001.parquet"))
                card += [f"  - split: {split}", f"    path: {name}/{split}-*.parquet"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "README.md").write_text("\n".join(card + ["---", ""]))
    return server.commit(repo, folder, repo_type="dataset")


def _sentiment_splits(seed: int = 7) -> dict:
    rows, seen = [], set()
    for r in make_rows(400, seed=seed):
        if r["text"] not in seen:
            seen.add(r["text"])
            rows.append(r)
    return {name: datasets.Dataset.from_list(rows[a:b], features=SENTIMENT)
            for name, (a, b) in {"train": (0, 120), "validation": (120, 160), "test": (160, 200)}.items()}


FAST = ["model.device=cpu", "eval.linear_probe=false", "train.batch_size=16", "train.log_every=1"]


def test_classification_trains_on_a_hub_dataset_and_records_its_commit(hf, tiny_bert, tmp_path):
    splits = _sentiment_splits()
    sha = publish(hf, "org/reviews", splits, tmp_path / "repo")
    run = tunelab.train(None, [f"model.path={tiny_bert}", "data.train=hf://org/reviews",
                               "data.validation=hf://org/reviews", "data.test=hf://org/reviews", "train.max_steps=4",
                               f"output_dir={tmp_path / 'run'}", *FAST])
    report = json.loads((run.dir / "data_report.json").read_text())
    for name, ds in splits.items():
        origin = report["splits"][name]["dataset"]
        assert origin == {"source": "hf://org/reviews", "kind": "hub", "repo": "org/reviews", "config": "default",
                          "split": name, "revision": "main", "commit": sha, "rows": ds.num_rows,
                          "datasets": datasets.__version__}
        assert report["splits"][name]["rows"] == ds.num_rows
    assert report["files"]["train"] == "hf://org/reviews"
    assert json.loads((run.dir / "labels.json").read_text())["labels"] == ["neg", "pos"]  # class names, not ids
    assert "test" in run.summary and run.summary["steps"] == 4
    # the commit read is pinned in config.yaml (resume reads the same rows when main moves) and named in versions.json
    assert config.load(run.dir / "config.yaml", []).data.dataset_revision == sha
    assert json.loads((run.dir / "versions.json").read_text())["hub_datasets"] == {
        f"data.{name}": {"repo": "org/reviews", "config": "default", "split": name, "revision": "main", "commit": sha}
        for name in splits}
    fetched = hf.fetched("org/reviews", "dataset")
    assert sorted(f for f in fetched if f.endswith(".parquet")) == [f"data/{s}-00000-of-00001.parquet"
                                                                    for s in ("test", "train", "validation")]
    # a second run reads the cache: nothing is downloaded again
    before = len(hf.fetched("org/reviews", "dataset"))
    tunelab.train(None, [f"model.path={tiny_bert}", "data.train=hf://org/reviews", "train.max_steps=1",
                         f"output_dir={tmp_path / 'again'}", *FAST])
    assert len(hf.fetched("org/reviews", "dataset")) == before


def test_sft_trains_on_an_alpaca_dataset_from_the_hub(hf, tiny_chat_llama, tmp_path):
    rows = make_chat_rows(80, seed=3, fmt="alpaca")
    publish(hf, "org/alpaca", {"train": datasets.Dataset.from_list(rows)}, tmp_path / "repo")
    run = tunelab.train(None, [f"model.path={tiny_chat_llama}", "data.train=hf://org/alpaca", "data.format=alpaca",
                               "task.type=sft", "data.dedupe=false", "data.max_length=64", "train.batch_size=8",
                               "train.max_steps=3", "eval.samples=1", "eval.max_new_tokens=4",
                               f"output_dir={tmp_path / 'run'}", "model.device=cpu"])
    report = json.loads((run.dir / "data_report.json").read_text())
    assert report["splits"]["train"]["format"] == "alpaca"
    assert report["splits"]["train"]["rows"] + report["splits"]["train"]["held_out"] == 80
    assert run.summary["steps"] == 3 and math_finite(run.summary["eval"]["loss"])


def math_finite(x) -> bool:
    return x == x and abs(x) != float("inf")


def test_dpo_trains_on_a_preference_dataset_from_the_hub(hf, tiny_chat_llama, tmp_path):
    rows = _rows("dpo", 60, seed=2)
    publish(hf, "org/prefs", {"train": datasets.Dataset.from_list(rows[:50]),
                              "test": datasets.Dataset.from_list(rows[50:60])}, tmp_path / "repo")
    run = tunelab.train(None, [f"model.path={tiny_chat_llama}", "data.train=hf://org/prefs", "task.type=dpo",
                               "data.validation=hf://org/prefs", "data.validation_split=test", "method.name=lora",
                               "train.batch_size=8", "train.max_steps=3", "eval.samples=1", "eval.max_new_tokens=4",
                               "data.max_length=64", "eval.forgetting=none", f"output_dir={tmp_path / 'run'}",
                               "model.device=cpu"])
    report = json.loads((run.dir / "data_report.json").read_text())
    assert report["splits"]["validation"]["dataset"]["split"] == "test"
    assert report["splits"]["validation"]["rows"] == 10 and run.summary["steps"] == 3


def test_hub_configurations_and_revisions(hf, tmp_path):
    en = datasets.Dataset.from_list([{"text": f"en {i}", "label": "ab"[i % 2]} for i in range(20)])
    fr = datasets.Dataset.from_list([{"text": f"fr {i}", "label": "ab"[i % 2]} for i in range(30)])
    first = publish(hf, "org/multi", {}, tmp_path / "repo", configs={"en": {"train": en}, "fr": {"train": fr}})
    publish(hf, "org/multi", {}, tmp_path / "repo", configs={"en": {"train": en.select(range(10))}, "fr": {"train": fr}})
    hf.tag("org/multi", "v1", first, repo_type="dataset")

    def rows(*extra):
        return data.load_splits(_cfg("classification", "hf://org/multi", "data.val_fraction=0.2", *extra).data, 0)

    splits, report = rows("data.dataset_config=fr")
    assert len(splits["train"]) + len(splits["validation"]) == 30
    assert report["splits"]["train"]["dataset"]["config"] == "fr"
    assert rows("data.dataset_config=en")[1]["splits"]["train"]["rows_read"] == 10  # main
    tagged = rows("data.dataset_config=en", "data.dataset_revision=v1")[1]["splits"]["train"]
    assert tagged["rows_read"] == 20 and tagged["dataset"]["commit"] == first and tagged["dataset"]["revision"] == "v1"
    with pytest.raises(TunelabError, match=r"has several configurations: \['en', 'fr'\]\. Choose one with "
                                           r"data\.dataset_config"):
        rows()
    with pytest.raises(TunelabError, match=r"has no configuration 'de' \(data\.dataset_config\); its configurations: "
                                           r"\['en', 'fr'\]"):
        rows("data.dataset_config=de")


def test_the_commit_read_is_what_a_run_pins_so_resume_reads_the_same_rows(hf, tmp_path):
    splits = _sentiment_splits()
    first = publish(hf, "org/reviews", splits, tmp_path / "repo")
    cfg = _cfg("classification", "hf://org/reviews", "data.validation=hf://org/reviews").data
    rows, report = data.load_splits(cfg, 0)
    assert data_hub.record(report) == {f"data.{s}": {"repo": "org/reviews", "config": "default", "split": s,
                                                     "revision": "main", "commit": first} for s in ("train", "validation")}
    assert data_hub.pinned(report) == first
    publish(hf, "org/reviews", {k: v.select(range(30)) for k, v in splits.items()}, tmp_path / "repo")  # main moves
    assert len(data.load_splits(cfg, 0)[0]["train"]) == 30
    again, _ = data.load_splits(cfg.model_copy(update={"dataset_revision": first}), 0)
    assert again == rows
    publish(hf, "org/other", splits, tmp_path / "repo")
    _, mixed = data.load_splits(_cfg("classification", "hf://org/reviews", "data.validation=hf://org/other").data, 0)
    assert data_hub.pinned(mixed) is None and len(data_hub.record(mixed)) == 2


HUB_ERRORS = {
    "no such dataset": (["data.train=hf://org/nope"], r"there is no dataset 'org/nope' on the Hub, or it is private"),
    "no such revision": (["data.dataset_revision=v9"], r"the dataset has no revision 'v9' \(data\.dataset_revision\)"),
    "no such split": (["data.test=hf://org/reviews", "data.test_split=dev"],
                      r"\(data\.test\) has no split 'dev'; its splits: 'train', 'validation', 'test'\. Set "
                      r"data\.test_split to one of them"),
    "gated": (["data.train=hf://org/gated"], r"is a gated dataset: accept its terms .* set HF_TOKEN"),
    "missing column": (["data.text_field=sentence"], r"has no 'sentence' column in the dataset; columns found: 'text', "
                                                     r"'label'\. Set data\.text_field"),
    "not an id": (["data.train=hf://org/a b"], r"is not a Hub dataset id\. Write hf://org/name"),
    "the hub's url form": (["data.train=hf://datasets/org/reviews"], r"without 'datasets/'.*: hf://org/reviews"),
}


@pytest.mark.parametrize("case", list(HUB_ERRORS))
def test_hub_errors_say_what_to_fix(case, hf, tmp_path):
    splits = _sentiment_splits()
    publish(hf, "org/reviews", splits, tmp_path / "repo")
    publish(hf, "org/gated", splits, tmp_path / "repo")
    hf.gate("org/gated", "hf_granted", repo_type="dataset")
    extra, message = HUB_ERRORS[case]
    with pytest.raises(TunelabError, match=message):
        data.load_splits(_cfg("classification", "hf://org/reviews", *extra).data, 0)


def test_offline_reads_the_cached_commit_and_refuses_what_is_not_cached(hf, tmp_path, monkeypatch):
    splits = _sentiment_splits()
    sha = publish(hf, "org/reviews", splits, tmp_path / "repo")
    online, _ = data.load_splits(_cfg("classification", "hf://org/reviews").data, 0)
    newer = publish(hf, "org/reviews", {"train": splits["train"].select(range(60))}, tmp_path / "repo")
    offline(monkeypatch, True)
    hf.requests.clear()
    cached, report = data.load_splits(_cfg("classification", "hf://org/reviews").data, 0)
    assert cached == online and report["splits"]["train"]["dataset"]["commit"] == sha and not hf.requests
    with pytest.raises(TunelabError, match=rf"offline \(HF_HUB_OFFLINE=1\), the cache holds commit {sha} of "
                                           rf"org/reviews, not revision '{newer}'"):
        data.load_splits(_cfg("classification", "hf://org/reviews", f"data.dataset_revision={newer}").data, 0)
    with pytest.raises(TunelabError, match=r"offline mode is on \(HF_HUB_OFFLINE=1\) and the datasets cache \(.*hf-home/datasets; "
                                           r"HF_HOME / HF_DATASETS_CACHE\) holds no copy of org/other"):
        data.load_splits(_cfg("classification", "hf://org/other").data, 0)


def test_the_cli_trains_on_a_hub_dataset_and_exits_2_on_a_missing_one(hf, tiny_bert, tmp_path, cli_run):
    publish(hf, "org/reviews", _sentiment_splits(), tmp_path / "repo")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{path: {tiny_bert}, device: cpu}}\ndata: {{train: hf://org/reviews, validation: "
                      f"hf://org/reviews}}\ntrain: {{max_steps: 2, batch_size: 16}}\neval: {{linear_probe: false}}\n"
                      f"output_dir: {tmp_path / 'run'}\n")
    result = cli_run("train", str(recipe))
    assert result.code == 0, result.err
    assert "train: hf://org/reviews" in result.out and "dataset: split train, config default" in result.out
    result = cli_run("train", str(recipe), "data.train=hf://org/missing", f"output_dir={tmp_path / 'other'}")
    assert result.code == 2 and "there is no dataset 'org/missing' on the Hub" in result.err
    assert "Traceback" not in result.err


# -- in memory: the Python API ----------------------------------------------------------------------------------

def _resume_args(model: Path, out: Path) -> list[str]:
    return [f"model.path={model}", "method.name=full", "train.max_steps=8", "train.batch_size=8",
            "train.checkpoint_every=2", "train.eval_every=4", "train.keep_finished_checkpoints=true",
            f"output_dir={out}", *FAST]


def test_an_in_memory_dataset_trains_records_its_content_hash_and_resumes_only_with_the_same_data(tiny_bert, tmp_path,
                                                                                                 cli_run):
    splits = _sentiment_splits()
    dd = datasets.DatasetDict(train=splits["train"], validation=splits["validation"])
    whole = tunelab.train(None, _resume_args(tiny_bert, tmp_path / "whole"), data=dd)
    recorded = config.load(whole.dir / "config.yaml", []).data
    digest = data_hub.content_sha256(dd)[:16]
    name = f"<in-memory DatasetDict (train 120 rows, validation 40 rows), sha256 {digest}>"
    assert recorded.train == recorded.validation == name  # the DatasetDict's validation split is data.validation
    assert json.loads((whole.dir / "data_report.json").read_text())["split"]["method"] == "file"

    crashed = tmp_path / "crashed"
    shutil.copytree(whole.dir, crashed)
    for p in (crashed / "checkpoints").glob("step-*"):
        if int(p.name.split("-")[1]) > 4:
            shutil.rmtree(p)
    (crashed / "summary.json").unlink()
    copy = datasets.DatasetDict({k: datasets.Dataset.from_list(v.to_list(), features=v.features) for k, v in dd.items()})
    del dd, splits  # the run's dataset is gone: only its name is left in config.yaml
    gc.collect()
    with pytest.raises(TunelabError, match=rf"data.train names an in-memory dataset \({re.escape(name)}\) that was "
                                           rf"passed to tunelab.train\(data=...\) in Python; it is not saved with the "
                                           rf"run.*tunelab.resume\(run_dir, data=...\)"):
        tunelab.resume(crashed)
    result = cli_run("train", "--resume", str(crashed))
    assert result.code == 2 and "names an in-memory dataset" in result.err and "Traceback" not in result.err
    changed = datasets.DatasetDict(train=copy["train"].select(range(119)), validation=copy["validation"])
    with pytest.raises(TunelabError, match=r"The dataset passed as data.train .* is not the one this run trained on"):
        tunelab.resume(crashed, data=changed)
    resumed = tunelab.resume(crashed, data=copy)  # rebuilt from the same rows: the same content, the same hash
    a, b = (load_file(str(r / "model" / "model.safetensors")) for r in (whole.dir, resumed.dir))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_content_hash_follows_the_values_not_how_the_dataset_was_built():
    rows = [{"text": f"text {i}", "label": "ab"[i % 3 == 0]} for i in range(300)]
    ds = datasets.Dataset.from_list(rows)
    same = [datasets.Dataset.from_list(rows[::-1]).select(range(299, -1, -1)),
            datasets.concatenate_datasets([datasets.Dataset.from_list(rows[:100]), datasets.Dataset.from_list(rows[100:])])]
    assert all(data_hub.content_sha256(d) == data_hub.content_sha256(ds) for d in same)
    changed = [datasets.Dataset.from_list(rows[:17] + [{**rows[17], "text": "text 17 "}] + rows[18:]),
               ds.select(range(299)), ds.cast_column("label", datasets.ClassLabel(names=["a", "b"]))]
    assert len({data_hub.content_sha256(d) for d in [ds, *changed]}) == 4


def test_data_takes_a_dict_of_datasets_and_paths_and_refuses_what_it_cannot_index(tiny_bert, tmp_path):
    splits = _sentiment_splits()
    names = SENTIMENT["label"].names
    test_file = write_jsonl(tmp_path / "test.jsonl", [{**r, "label": names[r["label"]]} for r in splits["test"].to_list()])
    with pytest.raises(TunelabError, match=r"IterableDataset .* Pass a Dataset"):
        tunelab.train(None, _resume_args(tiny_bert, tmp_path / "x"), data=splits["train"].to_iterable_dataset())
    with pytest.raises(TunelabError, match=r"data= has the key\(s\) 'dev'; use 'train', 'validation' and 'test'"):
        tunelab.train(None, _resume_args(tiny_bert, tmp_path / "x"), data={"train": splits["train"], "dev": None})
    run = tunelab.train(None, _resume_args(tiny_bert, tmp_path / "run") + ["train.max_steps=2"],
                        data={"train": splits["train"], "validation": splits["validation"], "test": str(test_file)})
    cfg = config.load(run.dir / "config.yaml", []).data
    assert cfg.train.startswith("<in-memory Dataset, 120 rows, sha256 ") and cfg.test == str(test_file)
    assert "test" in run.summary


# -- data.streaming ----------------------------------------------------------------------------------------------

def _messy(n: int, seed: int) -> list[dict]:
    """Rows with what cleaning drops: empty and missing texts, missing labels, repeats, texts with two labels."""
    rng = random.Random(seed)
    texts = ["good film", "bad  film", "  ok\tfine ", "", "great", None]
    return [{"text": rng.choice(texts + [f"text {i}", f"text {i % 50}"]), "label": rng.choice(["pos", "neg", "", None])}
            for i in range(n)]


@pytest.mark.parametrize("where", ["disk", "hub"])
def test_a_streamed_dataset_gives_the_rows_and_report_of_the_in_memory_path(where, tmp_path, request):
    ds = datasets.Dataset.from_list(_messy(600, seed=1))
    if where == "disk":
        ds.save_to_disk(str(tmp_path / "saved"))
        source = str(tmp_path / "saved")
    else:
        publish(request.getfixturevalue("hf"), "org/messy", {"train": ds}, tmp_path / "repo")
        source = "hf://org/messy"
    plain = data.load_splits(_cfg("classification", source).data, 7)
    streamed = data.load_splits(_cfg("classification", source, "data.streaming=true").data, 7)
    assert sum(plain[1]["splits"]["train"]["dropped"].values()) > 100
    for name in plain[0]:
        assert isinstance(streamed[0][name], stream.Rows)
        assert [{**r, "label": data.canonical_label(r["label"])} for r in plain[0][name]] == list(streamed[0][name])
    for entry in streamed[1]["splits"].values():
        assert entry.pop("streamed") is True
    assert plain[1] == streamed[1]


def test_a_streamed_dataset_run_trains_exactly_like_an_in_memory_one(tiny_bert, tmp_path):
    datasets.Dataset.from_list(_messy(400, seed=4)).save_to_disk(str(tmp_path / "saved"))
    args = [f"model.path={tiny_bert}", f"data.train={tmp_path / 'saved'}", "method.name=full", "train.max_steps=6",
            "train.batch_size=8", "train.group_by_length=true", "eval.samples=2", *FAST]
    runs = {s: tunelab.train(None, args + [f"data.streaming={str(s).lower()}", f"output_dir={tmp_path / str(s)}"])
            for s in (False, True)}
    losses = {s: [r["loss"] for r in map(json.loads, (run.dir / "metrics.jsonl").read_text().splitlines())
                  if r.get("type") == "train"] for s, run in runs.items()}
    assert len(losses[True]) == 6 and losses[True] == losses[False]
    a, b = (load_file(str(run.dir / "model" / "model.safetensors")) for run in (runs[False], runs[True]))
    assert all(torch.equal(a[k], b[k]) for k in a)
