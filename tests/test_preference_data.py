"""Preference pairs (the data of the reward model and DPO): rows, rendering with the sft template, the reply-only
labels, length rules, and the messages for bad rows."""

from __future__ import annotations

import pytest
from conftest import write_jsonl
from transformers import AutoTokenizer

from tunelab import TunelabError
from tunelab.config import DataConfig
from tunelab.data import chat, preference

PAIRS = [
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is up?"}],
     "chosen": [{"role": "assistant", "content": "The sky."}], "rejected": [{"role": "assistant", "content": "Go away."}]},
]


def _read(tmp_path, rows, **data):
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    return preference.read(str(path), "data.train", DataConfig(train=str(path), **data))


def test_strings_and_chat_lists_become_the_same_shape(tmp_path):
    pairs, entry = _read(tmp_path, PAIRS)
    assert pairs[0]["prompt"] == [{"role": "user", "content": "Name a colour."}]
    assert (pairs[1]["chosen"], pairs[1]["rejected"]) == ("The sky.", "Go away.")
    assert [m["role"] for m in pairs[1]["prompt"]] == ["system", "user", "assistant", "user"]
    assert entry == {"format": "preference", "rows_read": 2, "dropped": {"duplicate": 0}, "rows": 2}
    again, entry = _read(tmp_path, PAIRS + PAIRS[:1])
    assert len(again) == 2 and entry["dropped"]["duplicate"] == 1


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_only_the_final_reply_is_labelled_and_both_sides_share_the_prompt(tmp_path, tiny_chat_llama, template):
    tok = AutoTokenizer.from_pretrained(tiny_chat_llama)
    pairs, _ = _read(tmp_path, PAIRS)
    feats, stats = preference.encode(pairs, tok, template, max_length=256)
    assert stats["examples"] == 2 and stats["cut_reply"] == 0
    for f, p in zip(feats, pairs):
        for side in ("chosen", "rejected"):
            ids, labels = f[f"{side}_ids"], f[f"{side}_labels"]
            scored = [t for t, x in zip(ids, labels) if x != -100]
            assert scored == [x for x in labels if x != -100]
            # the scored tokens decode to the reply (and the end-of-turn marker), never to prompt text
            text = tok.decode(scored)
            assert text.startswith(p[side]) and "Hello!" not in text and "Name a colour" not in text
            # the same tokens as sft's rendering of prompt + reply: one template for both stages
            full, _ = chat.render(p["prompt"] + [{"role": "assistant", "content": p[side]}], template, tok)
            assert ids == tok(full, add_special_tokens=template == "alpaca")["input_ids"]
        first = lambda ls: next(i for i, x in enumerate(ls) if x != -100)
        assert f["chosen_ids"][: first(f["chosen_labels"])] == f["rejected_ids"][: first(f["rejected_labels"])]


def test_a_long_reply_is_cut_and_a_long_prompt_is_a_clear_error_or_dropped(tmp_path, tiny_chat_llama):
    tok = AutoTokenizer.from_pretrained(tiny_chat_llama)
    rows = [{"prompt": "Say it.", "chosen": "word " * 80, "rejected": "No."},
            {"prompt": "why " * 80, "chosen": "Yes.", "rejected": "No."}]
    pairs, _ = _read(tmp_path, rows)
    with pytest.raises(TunelabError, match=r"1 preference pair\(s\) have a prompt of data.max_length=40 tokens or "
                                           r"more.*row 2.*data.truncation=drop"):
        preference.encode(pairs, tok, "chat", max_length=40)
    feats, stats = preference.encode(pairs, tok, "chat", max_length=40, truncation="drop")
    assert stats["dropped_too_long"] == 1 and stats["cut_reply"] == 1 and len(feats) == 1
    assert len(feats[0]["chosen_ids"]) == 40 and any(x != -100 for x in feats[0]["chosen_labels"])


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Hi", "chosen": "Same.", "rejected": " Same. "}, "'chosen' and 'rejected' are the same reply"),
    ({"prompt": "Hi", "chosen": "Yes."}, "no 'rejected' field"),
    ({"chosen": "Yes.", "rejected": "No."}, "no 'prompt' field"),
    ({"prompt": "Hi", "chosen": "", "rejected": "No."}, "'chosen' is empty"),
    ({"prompt": "Hi", "chosen": 3, "rejected": "No."}, "'chosen' is int, not a string"),
    ({"prompt": "Hi", "chosen": [{"role": "user", "content": "x"}], "rejected": "No."}, "'chosen' as a list must hold exactly one"),
    ({"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "chosen": "A",
      "rejected": "B"}, "'prompt' roles are out of order"),
    ({"prompt": {"text": "Hi"}, "chosen": "A", "rejected": "B"}, "'prompt' is neither a string nor"),
])
def test_bad_rows_are_named_with_the_fix(tmp_path, row, message):
    with pytest.raises(TunelabError, match=r"pairs.jsonl' \(data.train\) row 2: " + message.replace("(", r"\(")):
        _read(tmp_path, [PAIRS[0], row])


def test_every_bad_row_is_counted(tmp_path):
    rows = [PAIRS[0], {"prompt": "a", "chosen": "x", "rejected": "x"}, {"prompt": "b"}, PAIRS[0]]
    with pytest.raises(TunelabError, match=r"row 2: .*\(2 rows have problems: 2, 3\).*looks like"):
        _read(tmp_path, rows)
