"""Data loading: formats, cleaning counts, stratified split, report, and every user-facing error."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_rows, write_jsonl

from tunelab.config import DataConfig
from tunelab.data import format_report, inspect, load_splits
from tunelab.data.clean import canonical_label, clean_examples
from tunelab.data.sources import read_examples
from tunelab.data.split import stratified_split
from tunelab.errors import TunelabError


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    import csv

    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(TunelabError) as exc:
        fn(*args, **kwargs)
    message = str(exc.value)
    assert "\n" not in message, "error messages are one paragraph"
    return message


def pairs(examples: list[dict]) -> list[tuple[str, str]]:
    return [(ex["text"], canonical_label(ex["label"])) for ex in examples]


# -- formats -----------------------------------------------------------------------

def test_jsonl_csv_tsv_parquet_give_identical_examples(tmp_path):
    rows = make_rows(30, seed=3)
    rows[0]["text"] = 'has, a comma and "quotes"\nand a newline'
    loaded = {
        "jsonl": read_examples(write_jsonl(tmp_path / "d.jsonl", rows)),
        "json": read_examples(write_jsonl(tmp_path / "d.json", rows)),
        "csv": read_examples(write_csv(tmp_path / "d.csv", rows)),
        "tsv": read_examples(write_csv(tmp_path / "d.tsv", rows, delimiter="\t")),
        "parquet": read_examples(write_parquet(tmp_path / "d.parquet", rows)),
    }
    expected = [(r["text"], r["label"]) for r in rows]
    for fmt, examples in loaded.items():
        assert [(ex["text"], ex["label"]) for ex in examples] == expected, fmt
    assert [ex["row"] for ex in loaded["jsonl"]] == list(range(1, 31))
    assert [ex["row"] for ex in loaded["parquet"]] == list(range(1, 31))
    # CSV rows are the line each record starts on: header is line 1, record 1 spans lines 2-3.
    assert [ex["row"] for ex in loaded["csv"]][:3] == [2, 4, 5]


def test_jsonl_rows_are_line_numbers_and_blank_lines_are_skipped(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": 1}\n\n   \n{"text": "b", "label": 0}\n', encoding="utf-8")
    assert [(ex["text"], ex["label"], ex["row"]) for ex in read_examples(p)] == [("a", 1, 1), ("b", 0, 4)]


def test_csv_string_labels_match_jsonl_int_labels(tmp_path):
    rows = [{"text": f"example {i}", "label": i % 2} for i in range(10)]
    from_jsonl = read_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    from_csv = read_examples(write_csv(tmp_path / "d.csv", rows))
    assert [ex["label"] for ex in from_csv][:2] == ["0", "1"]
    assert pairs(from_jsonl) == pairs(from_csv)


def test_canonical_label():
    assert canonical_label(1) == canonical_label("1") == canonical_label(" 1 ") == canonical_label(1.0) == "1"
    assert canonical_label(True) == "true" and canonical_label(False) == "false"
    assert canonical_label(0.5) == "0.5"
    assert canonical_label(" pos\t") == "pos"


def test_utf8_bom_is_accepted(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes(b"\xef\xbb\xbftext,label\nhello,pos\n")
    assert pairs(read_examples(p)) == [("hello", "pos")]


# -- cleaning --------------------------------------------------------------------

def test_cleaning_counts(tmp_path):
    rows = [
        {"text": "  good\tfilm \n ok ", "label": "pos"},  # 1 -> "good film ok"
        {"text": "good film ok", "label": "pos"},          # 2 duplicate after whitespace normalisation
        {"text": "", "label": "pos"},                      # 3 empty_text
        {"text": "   \n ", "label": "neg"},                # 4 empty_text
        {"text": None, "label": "neg"},                    # 5 empty_text
        {"text": "no label", "label": None},               # 6 missing_label
        {"text": "blank label", "label": "  "},            # 7 missing_label
        {"text": "nan label", "label": float("nan")},      # 8 missing_label
        {"text": "mixed", "label": "pos"},                 # 9 conflicting_label
        {"text": "mixed", "label": "neg"},                 # 10 conflicting_label
        {"text": "mixed", "label": "pos"},                 # 11 conflicting_label (all rows of the text go)
        {"text": "bad film", "label": "neg"},              # 12 kept
        {"text": 42, "label": "neg"},                      # 13 kept as "42"
        {"text": "one", "label": 1},                       # 14 kept
        {"text": "one", "label": "1"},                     # 15 duplicate: same canonical label
    ]
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")  # json writes NaN for nan
    kept, dropped = clean_examples(read_examples(p))
    assert dropped == {"empty_text": 3, "missing_label": 3, "duplicate": 2, "conflicting_label": 3}
    assert [(ex["text"], ex["row"]) for ex in kept] == [("good film ok", 1), ("bad film", 12), ("42", 13), ("one", 14)]
    assert len(kept) + sum(dropped.values()) == len(rows)

    kept, dropped = clean_examples(read_examples(p), dedupe=False)
    assert dropped == {"empty_text": 3, "missing_label": 3, "duplicate": 0, "conflicting_label": 0}
    assert len(kept) == 9

    report = inspect(p)
    assert report["rows_read"] == 15 and report["rows"] == 4
    assert report["dropped"]["conflicting_label"] == 3


# -- stratified split --------------------------------------------------------------

def _examples(n_pos: int, n_neg: int, n_rare: int = 0) -> list[dict]:
    labels = ["pos"] * n_pos + ["neg"] * n_neg + ["rare"] * n_rare
    return [{"text": f"t{i}", "label": y, "row": i + 1} for i, y in enumerate(labels)]


def test_stratified_split_is_deterministic_and_proportional():
    examples = _examples(120, 60, 1)
    train, val = stratified_split(examples, 0.25, seed=7)
    train2, val2 = stratified_split(examples, 0.25, seed=7)
    assert (train, val) == (train2, val2)
    assert Counter(ex["label"] for ex in val) == {"pos": 30, "neg": 15}  # singleton class stays in train
    assert {ex["text"] for ex in train} & {ex["text"] for ex in val} == set()
    assert sorted(train + val, key=lambda ex: ex["row"]) == examples
    # Original order is kept within each output.
    assert [ex["row"] for ex in val] == sorted(ex["row"] for ex in val)
    assert [ex["row"] for ex in train] == sorted(ex["row"] for ex in train)

    _, val_other = stratified_split(examples, 0.25, seed=8)
    assert val_other != val


def test_stratified_split_small_classes():
    # Round(2 * 0.1) = 0, but a class with 2+ rows gives at least one; never all of a class.
    train, val = stratified_split(_examples(2, 3), 0.1, seed=0)
    assert Counter(ex["label"] for ex in val) == {"pos": 1, "neg": 1}
    train, val = stratified_split(_examples(2, 2), 0.9, seed=0)
    assert Counter(ex["label"] for ex in train) == {"pos": 1, "neg": 1}


# -- load_splits and report --------------------------------------------------------

def test_load_splits_holds_out_validation(tmp_path, sentiment_files):
    cfg = DataConfig(train=str(sentiment_files["train"]), test=str(sentiment_files["test"]), val_fraction=0.2)
    splits, report = load_splits(cfg, seed=3)
    assert set(splits) == {"train", "validation", "test"}
    assert report["split"] == {"method": "stratified", "val_fraction": 0.2, "seed": 3}
    assert report["files"]["validation"] is None
    assert report["files"]["train"] == str(sentiment_files["train"].absolute())

    tr, va = report["splits"]["train"], report["splits"]["validation"]
    assert tr["rows"] == len(splits["train"]) and va["rows"] == len(splits["validation"])
    assert tr["rows"] + va["rows"] + sum(tr["dropped"].values()) == tr["rows_read"] == 240
    assert va["from"] == "train" and va["overlap_with_train"] == 0
    assert set(va["dropped"].values()) == {0}
    assert list(tr["labels"]) == ["neg", "pos"]
    assert sum(tr["labels"].values()) == tr["rows"]
    for ex in splits["train"]:
        assert set(ex) == {"text", "label", "row"}

    # Same seed, same split; the union of train and validation is the cleaned train file.
    again, _ = load_splits(cfg, seed=3)
    assert again == splits
    cleaned, _ = clean_examples(read_examples(sentiment_files["train"]))
    assert sorted(splits["train"] + splits["validation"], key=lambda ex: ex["row"]) == cleaned

    json.dumps(report)  # it is written to data_report.json
    text = format_report(report)
    for n in (tr["rows_read"], tr["rows"], va["rows"], report["splits"]["test"]["rows"]):
        assert str(n) in text
    assert "stratified" in text and "seed 3" in text


def test_load_splits_with_validation_file_counts_overlap(tmp_path):
    train_rows = make_rows(40, seed=1)
    val_rows = make_rows(10, seed=2) + train_rows[:3]  # three texts leak from train
    cfg = DataConfig(
        train=str(write_csv(tmp_path / "train.csv", train_rows)),
        validation=str(write_jsonl(tmp_path / "val.jsonl", val_rows)),
    )
    splits, report = load_splits(cfg, seed=0)
    assert report["split"]["method"] == "file"
    assert set(splits) == {"train", "validation"} and "test" not in report["splits"]
    cleaned_train, _ = clean_examples(read_examples(tmp_path / "train.csv"))
    assert splits["train"] == cleaned_train
    train_texts = {ex["text"] for ex in cleaned_train}
    expected = sum(ex["text"] in train_texts for ex in splits["validation"])
    assert expected >= 3
    assert report["splits"]["validation"]["overlap_with_train"] == expected
    assert "from" not in report["splits"]["validation"]
    assert f"texts also in train: {expected}" in format_report(report)


def test_inspect_numbers_and_format(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "a b", "label": 1},             # 3 chars, 2 words
        {"text": "ccc  dd\teeee", "label": 0},   # "ccc dd eeee": 11 chars, 3 words
        {"text": "f", "label": 1},               # 1 char, 1 word
        {"text": "f", "label": 1},               # duplicate
        {"text": "", "label": 0},                # empty
    ])
    report = inspect(p)
    assert report["rows_read"] == 5 and report["rows"] == 3
    assert report["dropped"] == {"empty_text": 1, "missing_label": 0, "duplicate": 1, "conflicting_label": 0}
    assert report["labels"] == {"0": 1, "1": 2}
    assert report["length"]["chars"] == {"min": 1, "median": 3, "mean": 5.0, "max": 11}
    assert report["length"]["words"] == {"min": 1, "median": 2, "mean": 2.0, "max": 3}
    text = format_report(report)
    assert "rows read: 5" in text and "kept: 3" in text and "1 duplicate" in text and "1 empty_text" in text
    assert "max 11" in text


def test_labels_are_sorted_numerically():
    from tunelab.data.clean import label_counts

    examples = [{"text": str(i), "label": y} for i, y in enumerate([10, 2, 2, 1])]
    assert list(label_counts(examples)) == ["1", "2", "10"]


# -- errors ------------------------------------------------------------------------

def test_error_missing_file_names_key_and_absolute_path(tmp_path):
    cfg = DataConfig(train=str(tmp_path / "nope.jsonl"))
    msg = error_of(load_splits, cfg, 0)
    assert "data.train" in msg and str((tmp_path / "nope.jsonl").absolute()) in msg

    train = write_jsonl(tmp_path / "train.jsonl", make_rows(20))
    msg = error_of(load_splits, DataConfig(train=str(train), test="missing-test.csv"), 0)
    assert "data.test" in msg and "missing-test.csv" in msg


def test_error_empty_file_and_no_data_rows(tmp_path):
    for name, content in [("e.jsonl", ""), ("e.csv", ""), ("e.parquet", "")]:
        p = tmp_path / name
        p.write_text(content)
        msg = error_of(read_examples, p, key="data.train")
        assert name in msg and "empty" in msg and "data.train" in msg

    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n")
    assert "no data rows" in error_of(read_examples, blank)
    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n")
    assert "no data rows" in error_of(read_examples, header_only)
    no_rows = tmp_path / "none.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.int64())}), no_rows)
    assert "no data rows" in error_of(read_examples, no_rows)


def test_error_malformed_json_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 1\n', encoding="utf-8")
    msg = error_of(read_examples, p, key="data.train")
    assert "bad.jsonl" in msg and "line 2" in msg and "each line must be one json object" in msg.lower()
    assert "delimiter" in msg  # json's own explanation is included

    p.write_text('{"text": "a", "label": 1}\n\n["b", 1]\n', encoding="utf-8")
    msg = error_of(read_examples, p)
    assert "line 3" in msg and "list" in msg and "not an object" in msg

    arr = tmp_path / "arr.json"
    arr.write_text('[{"text": "a", "label": 1}]')
    assert "JSON array" in error_of(read_examples, arr)


def test_error_missing_columns(tmp_path):
    rows = [{"sentence": "a", "label": 1, "id": 0}]
    for path in (write_jsonl(tmp_path / "d.jsonl", rows), write_csv(tmp_path / "d.csv", rows),
                 write_parquet(tmp_path / "d.parquet", rows)):
        msg = error_of(read_examples, path, key="data.train")
        assert path.name in msg and "'text'" in msg and "data.text_field" in msg
        assert "'sentence'" in msg and "'label'" in msg and "'id'" in msg

    msg = error_of(read_examples, tmp_path / "d.jsonl", text_field="sentence", label_field="Label")
    # a file given to a command (no config key) is fixed with the command's option
    assert "--label-field" in msg and "'Label'" in msg and "did you mean 'label'" in msg
    msg = error_of(read_examples, tmp_path / "d.jsonl", text_field="sentence", label_field="Label", key="data.train")
    assert "data.label_field=label" in msg

    p = tmp_path / "later.jsonl"
    p.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n{"txt": "c", "label": 1}\n')
    msg = error_of(read_examples, p)
    assert "later.jsonl" in msg and "line 3" in msg and "'text'" in msg and "txt" in msg


def test_error_non_utf8(tmp_path):
    p = tmp_path / "latin.csv"
    p.write_bytes("text,label\nok,1\ncaf\xe9 au lait,0\n".encode("latin-1"))
    msg = error_of(read_examples, p, key="data.validation")
    assert "latin.csv" in msg and "data.validation" in msg and "UTF-8" in msg
    assert "line 3" in msg and "byte 4 of that line" in msg and "byte offset 19" in msg and "0xe9" in msg
    assert "iconv -f latin1 -t utf-8" in msg


def test_error_unsupported_extension(tmp_path):
    p = tmp_path / "data.xlsx"
    p.write_bytes(b"PK\x03\x04")
    msg = error_of(read_examples, p, key="data.train")
    assert "data.xlsx" in msg and ".xlsx" in msg
    for ext in (".jsonl", ".csv", ".tsv", ".parquet"):
        assert ext in msg


def test_error_unreadable_parquet(tmp_path):
    p = tmp_path / "broken.parquet"
    p.write_bytes(b"this is not parquet at all")
    msg = error_of(read_examples, p, key="data.test")
    assert "broken.parquet" in msg and "data.test" in msg and "Parquet" in msg


def test_error_csv_record_with_wrong_field_count(tmp_path):
    p = tmp_path / "ragged.csv"
    p.write_text("text,label\nfine,1\nnot, quoted,0\n", encoding="utf-8")
    msg = error_of(read_examples, p)
    assert "ragged.csv" in msg and "line 3" in msg and "3 field(s)" in msg and "header has 2" in msg


def test_error_list_label(tmp_path):
    p = write_jsonl(tmp_path / "multi.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": ["x", "y"]}])
    msg = error_of(read_examples, p)
    assert "multi.jsonl" in msg and "line 2" in msg and "list" in msg


def test_error_no_rows_after_cleaning(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": "", "label": 1}, {"text": "x", "label": None}])
    msg = error_of(load_splits, DataConfig(train=str(p)), 0)
    assert "t.jsonl" in msg and "data.train" in msg and "1 empty_text" in msg and "1 missing_label" in msg


@pytest.mark.parametrize("text, fragment", [
    ('{"text": "a", "label": 1}\n{"text": "b", "label": 0, "label": 1}\n', "line 2 gives the key 'label' twice"),
    ('{"text": "a", "label": 1, "meta": [{"by": "x", "by": "y"}]}\n', "line 1 gives the key 'by' twice"),
    # a whole pair is one character (an emoji); half of one is not a character at all
    ('{"text": "ok \\ud83d\\ude00", "label": 1}\n{"text": "cut \\ud83d", "label": 0}\n',
     "line 2 holds a lone surrogate escape (\\ud83d) in 'text'"),
    ('{"text": "ok", "label": 1, "meta": {"tags": ["x", "\\uDC00"]}}\n', "(\\udc00) in 'meta' 'tags' item 2"),
    ("label\ttext\tlabel\nx\ty\tz\n", "line 1 (the header row) names the column 'label' twice (columns 1 and 3)"),
])
def test_error_key_given_twice_or_lone_surrogate(tmp_path, text, fragment):
    from tunelab.data.sources import read_records

    p = tmp_path / ("t.tsv" if "\t" in text else "t.jsonl")
    p.write_text(text, encoding="utf-8")
    for read in (read_examples, read_records):
        msg = error_of(read, p, key="data.train")
        assert str(p) in msg and fragment in msg


def test_unnamed_columns_may_repeat(tmp_path):
    p = tmp_path / "t.tsv"
    p.write_text("text\tlabel\t\t\nx\ty\t\t\n", encoding="utf-8")  # trailing delimiters: empty names, never read
    assert [ex["text"] for ex in read_examples(p)] == ["x"]


def test_error_too_few_rows_to_hold_out(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0}])
    msg = error_of(load_splits, DataConfig(train=str(p)), 0)
    assert "t.jsonl" in msg and "data.validation" in msg


# -- invisible texts, labels spelled two ways, huge rows -----------------------------------------------------------

INVISIBLE = ["\u200b", "\ufeff", "\u200c\u200d", " \u2060 ", "\u200b \u200b\t", "\u200e\u200f", "\u00ad", "\u2063"]


@pytest.mark.parametrize("streaming", [False, True])
def test_texts_of_only_invisible_format_characters_are_dropped_as_empty(tmp_path, streaming):
    rows = [{"text": t, "label": "pos"} for t in INVISIBLE] + make_rows(20, seed=1)
    rows += [{"text": "\U0001f469\u200d\U0001f52c works", "label": "pos"},  # a joiner inside an emoji: a real text
             {"text": "\u200bsee\u200b", "label": "neg"}]
    p = write_jsonl(tmp_path / "t.jsonl", rows)
    splits, report = load_splits(DataConfig(train=str(p), streaming=streaming), 0)
    entry = report["splits"]["train"]
    assert entry["dropped"]["empty_text"] == len(INVISIBLE) and entry["rows_read"] == len(rows)
    texts = {ex["text"] for name in ("train", "validation") for ex in splits[name]}
    assert {"\U0001f469\u200d\U0001f52c works", "\u200bsee\u200b"} <= texts
    assert not any(t.strip("\u200b\ufeff\u200c\u200d\u2060\u200e\u200f\u00ad\u2063 ") == "" for t in texts)
    assert f"{len(INVISIBLE)} empty_text" in format_report(report)


@pytest.mark.parametrize("streaming", [False, True])
def test_labels_that_read_as_the_same_number_are_a_warning_not_an_error(tmp_path, streaming):
    rows = [{"text": r["text"], "label": [1, "1.0", 0][i % 3]} for i, r in enumerate(make_rows(30, seed=4))]
    p = write_jsonl(tmp_path / "t.jsonl", rows)
    splits, report = load_splits(DataConfig(train=str(p), validation=str(p), streaming=streaming), 0)
    entry = report["splits"]["train"]
    assert set(entry["labels"]) == {"0", "1", "1.0"} and entry["label_spellings"] == [["1", "1.0"]]
    assert "warning: the labels '1' and '1.0' read as the same number but are different classes" in format_report(report)
    assert inspect(p)["label_spellings"] == [["1", "1.0"]]
    clean = write_jsonl(tmp_path / "c.jsonl", [{"text": r["text"], "label": [1, "1", 1.0][i % 3]} for i, r in enumerate(rows)])
    _, report = load_splits(DataConfig(train=str(clean), streaming=streaming), 0)  # one class, one spelling
    assert "label_spellings" not in report["splits"]["train"] and "warning" not in format_report(report)


def _huge_text(n_chars: int = 50_000_000) -> str:
    words = "the film was really quite moving and the cast was great "
    return "start " + words * (n_chars // len(words)) + "end"


@pytest.mark.parametrize("streaming", [False, True])
def test_a_50_mb_row_is_cut_before_cleaning_and_tokenising(tmp_path, tiny_bert, streaming):
    from transformers import AutoTokenizer

    from tunelab.data.clean import CHARS_PER_TOKEN
    from tunelab.tasks import classification

    huge = _huge_text()
    rows = make_rows(30, seed=5) + [{"text": huge, "label": "pos"}]
    p = write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = DataConfig(train=str(p), validation=str(p), max_length=32, streaming=streaming)
    splits, report = load_splits(cfg, 0)
    keep = 32 * CHARS_PER_TOKEN
    for name in ("train", "validation"):
        entry = report["splits"][name]
        assert entry["rows_cut"] == 1 and entry["cut_to_chars"] == keep
    assert f"1 rows cut to their first and last {keep:,} characters before tokenising" in format_report(report)
    cut = next(ex["text"] for ex in splits["train"] if ex["row"] == len(rows))
    assert len(cut) <= 2 * keep + 1 and cut.startswith("start the film") and cut.endswith("cast was great end")
    feats, stats = classification.encode(list(splits["train"]), AutoTokenizer.from_pretrained(tiny_bert),
                                         {"labels": ["neg", "pos"]}, 32)
    assert stats["truncated"] == 1 and max(len(f["input_ids"]) for f in feats) == 32


def test_huge_chat_and_preference_texts_are_cut_too(tmp_path):
    from types import SimpleNamespace

    from tunelab.data import chat, preference

    huge = _huge_text(5_000_000)
    cfg = SimpleNamespace(format="auto", text_field="text", dedupe=True, max_length=64)
    p = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "Summarise: " + huge}, {"role": "assistant", "content": "Films."}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}])
    rows, entry = chat.read(str(p), "data.train", cfg, "sft")
    assert entry["rows_cut"] == 1 and entry["cut_to_chars"] == 64 * 64
    user = rows[0]["messages"][0]["content"]
    assert len(user) == 2 * 64 * 64 + 1 and user.startswith("Summarise: start") and user.endswith("great end")
    assert rows[1]["messages"][0]["content"] == "Hi"
    p = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Say hi.", "input": huge, "output": "Hi."}])
    rows, entry = chat.read(str(p), "data.train", cfg, "sft")
    assert entry["rows_cut"] == 1 and rows[0]["messages"][0]["input"].endswith("great end")

    p = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Name a colour.", "chosen": huge, "rejected": "No."},
                                               {"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "No."}])
    pairs, entry = preference.read(str(p), "data.train", cfg)
    assert entry["rows_cut"] == 1 and len(pairs[0]["chosen"]) == 2 * 64 * 64 + 1 and pairs[1]["chosen"] == "Apple."

    from tunelab.tasks import embedding

    cfg = SimpleNamespace(anchor_field="anchor", positive_field="positive", negative_field=None, dedupe=True, max_length=64)
    p = write_jsonl(tmp_path / "pairs.jsonl", [{"anchor": "What is it about?", "positive": huge},
                                               {"anchor": "\u200b", "positive": "An empty anchor."}])
    with pytest.raises(TunelabError, match=r"row 2: 'anchor' \(anchor\) is empty"):
        embedding.read(str(p), "data.train", cfg)
    p = write_jsonl(tmp_path / "pairs.jsonl", [{"anchor": "What is it about?", "positive": huge}])
    rows, entry = embedding.read(str(p), "data.train", cfg)
    assert entry["rows_cut"] == 1 and len(rows[0]["positive"]) == 2 * 64 * 64 + 1


def test_a_run_on_data_with_a_50_mb_row_trains_and_reports_the_cut(tmp_path, tiny_bert, cli_run):
    import yaml

    p = write_jsonl(tmp_path / "t.jsonl", make_rows(40, seed=6) + [{"text": _huge_text(), "label": "neg"}])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_bert)}, "data": {"train": str(p), "max_length": 32}, "method": {"name": "full"},
        "train": {"max_steps": 1, "batch_size": 4},
        "eval": {"base": False, "linear_probe": False, "forgetting": "none", "samples": 0}}))
    r = cli_run("train", recipe, f"output_dir={tmp_path / 'run'}")
    assert r.code == 0, r.err[-3000:]
    assert "1 rows cut to their first and last 2,048 characters before tokenising" in r.out
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["splits"]["train"]["rows_cut"] == 1
