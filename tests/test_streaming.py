"""data.streaming: rows read from disk on demand give the same data, the same errors and the same training as the
in-memory path, while memory holds only ~40 bytes per row. (Peak RSS from 10k to 1M rows: bench/streaming.py.)"""

from __future__ import annotations

import csv
import json
import random
import tracemalloc
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_rows, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tunelab
from tunelab import config, data
from tunelab.config import DataConfig
from tunelab.data import stream
from tunelab.errors import TunelabError
from tunelab.evaluate import probe

BAD = Path(__file__).parent / "bad_inputs"


def _messy_rows(n: int, seed: int) -> list[dict]:
    """Rows with everything cleaning handles: empty and missing texts, missing labels, numbers as texts and labels,
    repeats, texts with two labels, odd whitespace."""
    rng = random.Random(seed)
    texts = ["good film", "bad  film", "  ok\tfine ", "", "great", None, 3.0]
    return [{"text": rng.choice(texts + [f"text {i}", f"text {i % 50}", f"line\u2028{i % 30}"]),
             "label": rng.choice(["pos", "neg", 1, 1.0, "", None, "  pos "]), "id": i} for i in range(n)]


def _write(path: Path, rows: list[dict]) -> Path:
    """JSONL with a UTF-8 byte-order mark, blank lines and CRLF endings; CSV/TSV with multi-line quoted fields."""
    if path.suffix == ".jsonl":
        with open(path, "w", encoding="utf-8-sig", newline="") as f:
            for r in rows:
                f.write(json.dumps(r) + ("\n\n" if r["id"] % 17 == 0 else "\r\n" if r["id"] % 5 == 0 else "\n"))
        return path
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        w.writerow(["text", "label"])
        for r in rows:
            text = "" if r["text"] is None else r["text"]
            w.writerow([text if r["id"] % 7 else f"two\nlines {text}", "" if r["label"] is None else r["label"]])
    return path


def _both(**kw):
    """(in-memory splits and report, streamed splits and report) for one DataConfig."""
    plain = data.load_splits(DataConfig(**kw), 7)
    streamed = data.load_splits(DataConfig(**kw, streaming=True), 7)
    return plain, streamed


def _same(plain, streamed) -> None:
    (a, report_a), (b, report_b) = plain, streamed
    assert list(a) == list(b)
    for name in a:
        assert isinstance(b[name], stream.Rows)
        assert [{**r, "label": data.canonical_label(r["label"])} for r in a[name]] == list(b[name])
    for entry in report_b["splits"].values():
        assert entry.pop("streamed") is True
    assert report_a == report_b


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv"])
@pytest.mark.parametrize("val_fraction", [0.1, 0.3])
def test_streamed_splits_equal_the_in_memory_ones(suffix, val_fraction, tmp_path):
    """Same kept rows in the same order, same drops per reason, same seeded validation hold-out, same report."""
    train = _write(tmp_path / f"train{suffix}", _messy_rows(600, seed=1))
    plain, streamed = _both(train=str(train), val_fraction=val_fraction, dedupe=True)
    assert sum(plain[1]["splits"]["train"]["dropped"].values()) > 100  # the file exercises every rule
    assert all(plain[1]["splits"]["train"]["dropped"].values())
    _same(plain, streamed)


def test_streamed_files_for_every_split_and_without_dedupe(tmp_path):
    files = {name: _write(tmp_path / f"{name}.jsonl", _messy_rows(200, seed=i)) for i, name in
             enumerate(("train", "validation", "test"))}
    plain, streamed = _both(**{k: str(v) for k, v in files.items()}, dedupe=False)
    assert plain[1]["splits"]["test"]["overlap_with_train"] > 0
    _same(plain, streamed)


def test_a_bad_file_gets_the_same_message_streamed(tmp_path):
    """Every malformed classification file of tests/bad_inputs (Parquet aside) gets the same message, word for
    word, from the streaming reader as from the in-memory one."""
    good = write_jsonl(tmp_path / "good.jsonl", make_rows(40, seed=2))
    cases = [c for c in yaml.safe_load((BAD / "cases.yaml").read_text(encoding="utf-8"))
             if "file" in c and not c.get("task") and c["use"] in ("data.train", "data.validation")
             and not c["file"].endswith(".parquet")]
    assert len(cases) >= 30
    for case in cases:
        bad = str(BAD / case["file"])
        kw = {"train": bad} if case["use"] == "data.train" else {"train": str(good), "validation": bad}
        messages = []
        for streaming in (False, True):
            with pytest.raises(TunelabError) as e:
                data.load_splits(DataConfig(**kw, streaming=streaming), 1)
            messages.append(str(e.value))
        assert messages[0] == messages[1], case["file"]


@settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(lines=st.lists(st.one_of(
    st.fixed_dictionaries({"text": st.one_of(st.text(max_size=12), st.none(), st.integers()),
                           "label": st.one_of(st.sampled_from(["a", "b", " a", ""]), st.integers(0, 2), st.none(),
                                              st.floats(allow_infinity=False))}).map(json.dumps),
    st.text(max_size=20), st.sampled_from(["", "[1]", '{"text": "x"}', "\r"])), min_size=1, max_size=25),
    suffix=st.sampled_from([".jsonl", ".csv"]))
def test_fuzzed_files_read_the_same_streamed(lines, suffix, tmp_path_factory):
    """Random JSON lines and text: both readers keep the same rows, or both stop with a TunelabError."""
    path = tmp_path_factory.mktemp("fuzz") / f"train{suffix}"
    if suffix == ".csv":
        body = "text,label\n" + "".join(f"{json.loads(x).get('text')},{json.loads(x).get('label')}\n"
                                         if x.startswith('{"text"') and x.endswith("}") and "label" in x else x + "\n"
                                         for x in lines)
    else:
        body = "\n".join(lines) + "\n"
    path.write_text(body, encoding="utf-8")
    outcomes = []
    for streaming in (False, True):
        try:
            splits, report = data.load_splits(DataConfig(train=str(path), validation=str(path), streaming=streaming), 3)
            outcomes.append([{**r, "label": data.canonical_label(r["label"])} for r in splits["train"]])
        except TunelabError:
            outcomes.append("error")
    assert outcomes[0] == outcomes[1]


def test_the_index_keeps_about_40_bytes_a_row(tmp_path):
    """What loading keeps grows by the index arrays only: traced memory after loading 30,000 rows (about 2 MB of
    text) is under 48 bytes a row, and its peak during the pass under 100 bytes a row plus 2 MB."""
    n = 30_000
    train = write_jsonl(tmp_path / "big.jsonl", [{"text": f"row number {i} says {'yes' if i % 3 else 'no'} "
                                                          f"about film {i * 7919 % 10007}", "label": i % 3}
                                                 for i in range(n)])
    tracemalloc.start()
    try:
        splits, report = data.load_splits(DataConfig(train=str(train), streaming=True), 0)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report["splits"]["train"]["rows_read"] == n
    assert len(splits["train"]) + len(splits["validation"]) == n
    assert kept < 48 * n, kept
    assert peak < 100 * n + 2**21, peak
    assert splits["train"][5]["text"].startswith("row number")


def test_streamed_features_tokenise_on_demand_and_forget(tmp_path, tiny_bert, monkeypatch):
    from transformers import AutoTokenizer

    from tunelab.tasks import classification

    monkeypatch.setattr(stream, "CACHE", 8)
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(60, seed=0))
    splits, _ = data.load_splits(DataConfig(train=str(train), validation=str(train), streaming=True), 0)
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    info = {"labels": sorted(classification.labels_of(splits["train"]))}
    feats, stats = stream.encode(splits["train"], classification, tok, info, 8)
    eager, eager_stats = classification.encode(list(splits["train"]), tok, info, 8)
    assert stats == eager_stats and stats["truncated"] > 0
    assert [feats[i] for i in range(len(feats))] == eager == feats[:]
    assert feats.lengths.tolist() == [len(f["input_ids"]) for f in eager]
    assert len(feats._cache) <= 8


def _overrides(model: Path, train: Path, streaming: bool, out: Path) -> list[str]:
    return [f"model.path={model}", f"data.train={train}", f"data.streaming={str(streaming).lower()}",
            "method.name=full", "train.max_steps=12", "train.batch_size=8", "train.eval_every=6", "train.log_every=1",
            "train.group_by_length=true", "eval.samples=2", f"output_dir={out}"]


def test_a_streamed_run_trains_exactly_like_an_in_memory_one(tiny_bert, tmp_path):
    """Same data order, batches, losses, weights and metrics (base model and linear probe included)."""
    train = _write(tmp_path / "train.jsonl", _messy_rows(600, seed=4))
    runs = {s: tunelab.train(None, _overrides(tiny_bert, train, s, tmp_path / f"run-{s}")) for s in (False, True)}
    losses = {s: [r["loss"] for r in map(json.loads, (run.dir / "metrics.jsonl").read_text().splitlines())
                  if r.get("type") == "train"] for s, run in runs.items()}
    assert len(losses[True]) == 12 and losses[True] == losses[False]
    for key in ("eval", "base", "linear_probe", "train_tokens"):
        assert runs[True].summary[key] == runs[False].summary[key], key
    from safetensors.torch import load_file

    a, b = (load_file(str(run.dir / "model" / "model.safetensors")) for run in (runs[False], runs[True]))
    assert all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((runs[True].dir / "data_report.json").read_text())
    assert report["splits"]["train"]["streamed"] and report["splits"]["train"]["tokens"]["tokens"] > 0


def test_the_probe_fits_on_a_sample_of_a_long_training_split(tiny_bert, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(probe, "MAX_TRAIN_ROWS", 40)
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(120, seed=0))
    run = tunelab.train(None, _overrides(tiny_bert, train, True, tmp_path / "run")[:-5] +
                        ["train.max_steps=2", f"output_dir={tmp_path / 'run'}"])
    assert "sample of 40 of the" in capsys.readouterr().out
    assert 0 <= run.summary["linear_probe"]["validation"]["accuracy"] <= 1


@pytest.mark.parametrize("overrides, fragment", [
    (["task.type=token_classification"], "supported for task.type classification"),
    (["data.augment_copies=1"], "data.augment_copies"),
])
def test_streaming_refuses_what_it_cannot_stream(overrides, fragment, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"path": "m"}, "data": {"train": "t.jsonl", "streaming": True}}))
    with pytest.raises(TunelabError, match=fragment):
        config.load(recipe, overrides)


def test_parquet_is_refused_with_the_conversion(tmp_path):
    import pandas as pd

    path = tmp_path / "train.parquet"
    pd.DataFrame(make_rows(10)).to_parquet(path)
    with pytest.raises(TunelabError, match=r"data.streaming reads .*to_json"):
        data.load_splits(DataConfig(train=str(path), streaming=True), 0)


def test_a_file_changed_under_a_streamed_run_is_named(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(40, seed=0))
    splits, _ = data.load_splits(DataConfig(train=str(train), streaming=True), 0)
    train.write_text("x" * train.stat().st_size, encoding="utf-8")  # rewritten in place, same size
    with pytest.raises(TunelabError, match=r"changed while training read it \(line \d+"):
        splits["train"][3]
