"""`tunelab data inspect RECIPE`: the marked tokens are the ones training's collate labels (the tasks' own encode and
collate, with the model built as training builds it), each template lint on a tokenizer or template made to trip
it, the dedupe warning in inspect and in training, per-split mixes and length percentiles of the encoder tasks,
piped vs coloured output, and the HTML page in Chromium. Tiny models from conftest, generated rows."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
from conftest import OPPOSITES, make_chat_rows, make_rows, write_jsonl
from ner_fixtures import make_sentences, write_jsonl_tokens
from qa_fixtures import flat_rows, make_paragraphs
from test_report import _blank, _page_problems, _screenshot, chromium  # noqa: F401  (chromium: the fixture)
from transformers import AutoTokenizer

import tunelab
from tunelab import config, inspect, models, tasks
from tunelab.tasks import causal_lm

# Templates that trip one lint each (ChatML otherwise, as the fixture's own)
NO_SYSTEM = ("{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
             "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# the EOS that closes a reply is written at the start of the next user turn, outside the assistant's turn
LATE_EOS = ("{% for m in messages %}{% if m['role'] == 'user' and not loop.first %}{{ eos_token }}{% endif %}"
            "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# the generation prompt ends in a space that training tokenizes together with the reply's first word
SPACE_PROMPT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}")


def chat_model(tmp_path: Path, base: Path, name: str, template: str | None = None, **special) -> Path:
    """A copy of a tiny chat model whose tokenizer has another template or other special tokens."""
    out = tmp_path / name
    shutil.copytree(base, out)
    tok = AutoTokenizer.from_pretrained(base)
    if template is not None:
        tok.chat_template = template
    for key, value in special.items():
        setattr(tok, key, value)
    tok.save_pretrained(out)
    return out


def recipe(tmp_path: Path, model: Path, rows: list[dict], *overrides: str, task: str = "sft", name: str = "train"):
    train = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    return config.load(None, [f"model.path={model}", f"data.train={train}", f"task.type={task}", "method.name=lora",
                              "data.max_length=64", f"output_dir={tmp_path / 'run'}", *overrides])


def distinct_rows(n: int, reply: str = "The opposite of {a} is {b}.") -> list[dict]:
    """n different one-turn conversations (make_chat_rows repeats itself, and dedupe would drop repeats)."""
    pairs = [(a, b) for pair in OPPOSITES for a, b in (pair, pair[::-1])]
    return [{"messages": [{"role": "user", "content": f"What is the opposite of {a}?" + f" ({i})" * (i >= len(pairs))},
                          {"role": "assistant", "content": reply.format(a=a, b=b)}]}
            for i, (a, b) in enumerate(pairs[k % len(pairs)] for k in range(n))]


def multi_turn(n: int) -> list[dict]:
    rows = make_chat_rows(2 * n, seed=3)
    return [{"messages": a["messages"] + b["messages"]} for a, b in zip(rows[::2], rows[1::2])]


def codes(result: dict) -> list[str]:
    return [w["code"] for w in result["warnings"]]


def loss_text(part: dict) -> str:
    return "".join(text for text, mark in part["segments"] if mark == "loss")


# -- the marks are training's labels ------------------------------------------------------------------------------

def training_batch(cfg, n: int):
    """What training makes of the first n train rows: the task's build_model (weights and all), encode, collate."""
    task = tasks.get(cfg.task.type)
    splits, _ = task.load_splits(cfg, cfg.train.seed)
    info = task.label_info(splits, cfg)
    model, tok = task.build_model(cfg.model, info)
    max_length = models.max_input_length(model, tok, cfg.data.max_length)
    feats, _ = task.encode(splits["train"], tok, info, max_length)
    return task.collate(feats[:n], tok.pad_token_id), tok, info


def test_sft_marks_exactly_the_tokens_collate_gives_a_label_after_the_shift(tiny_chat_llama, tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Be terse."}, *r["messages"]]} for r in make_chat_rows(30)]
    cfg = recipe(tmp_path, tiny_chat_llama, rows, "data.dedupe=false")
    result = inspect.run(cfg, n=4)
    assert result["weights_loaded"] is False and result["template"] == "chat"
    batch, tok, info = training_batch(cfg, 4)
    assert info["template"] == result["template"]  # the template settled as build_model settles it
    assert len(result["examples"]) == 4
    for i, ex in enumerate(result["examples"]):
        part = ex["parts"][0]
        n = int(batch["attention_mask"][i].sum())
        assert part["ids"] == batch["input_ids"][i, :n].tolist()
        # the loss reads labels[:, 1:] against hidden[:, :-1]: position t is trained iff labels[t] != -100, t >= 1
        targets = batch["labels"][i, 1:n]
        assert part["marked"] == [t + 1 for t in (targets != -100).nonzero().flatten().tolist()]
        assert [part["ids"][t] for t in part["marked"]] == targets[targets != -100].tolist()
        reply = rows[i]["messages"][-1]["content"]
        assert loss_text(part) == reply + "<|im_end|>"  # the reply and its EOS, nothing of the prompt
        assert "EOS <|im_end|> at" in " ".join(part["facts"]) and "(trained)" in " ".join(part["facts"])
    assert sum(len(ex["parts"][0]["marked"]) for ex in result["examples"]) == causal_lm.count(batch)
    assert codes(result) == []


def test_dpo_shows_chosen_and_rejected_with_their_reply_tokens_marked(tiny_chat_llama, tmp_path):
    pairs = [{"prompt": f"What is the opposite of {a}?", "chosen": f"The opposite of {a} is {b}.",
              "rejected": f"I do not know {a}."} for a, b in [("hot", "cold"), ("up", "down"), ("big", "small")] * 4]
    for i, p in enumerate(pairs):
        p["prompt"] += " " * (i // 3)  # distinct rows: dedupe keeps them all
    cfg = recipe(tmp_path, tiny_chat_llama, pairs, task="dpo")
    result = inspect.run(cfg, n=2)
    batch, tok, _ = training_batch(cfg, 2)
    for i, ex in enumerate(result["examples"]):
        assert [p["name"] for p in ex["parts"]] == ["chosen", "rejected"]
        for side, part in enumerate(ex["parts"]):
            row = side * 2 + i  # collate: the chosen sides, then the rejected ones
            n = int(batch["attention_mask"][row].sum())
            targets = batch["labels"][row, 1:n]
            assert part["marked"] == [t + 1 for t in (targets != -100).nonzero().flatten().tolist()]
        by_row = {r["row"]: r for r in [{**p, "row": k + 1} for k, p in enumerate(pairs)]}
        assert loss_text(ex["parts"][0]) == by_row[ex["row"]]["chosen"] + "<|im_end|>"
        assert loss_text(ex["parts"][1]) == by_row[ex["row"]]["rejected"] + "<|im_end|>"


def test_reward_marks_the_reply_and_the_last_token_where_the_score_is_read(tiny_chat_llama, tmp_path):
    pairs = [{"prompt": f"Say {w}.", "chosen": f"{w}.", "rejected": "No."} for w in ("hot", "cold", "up", "down")]
    result = inspect.run(recipe(tmp_path, tiny_chat_llama, pairs, task="reward"), n=1)
    chosen = result["examples"][0]["parts"][0]
    # ChatML ends the turn with a newline after EOS: that newline is the last token, where the score is read
    assert chosen["segments"][-1] == ["\n", "loss"] and chosen["marked"][-1] == len(chosen["ids"]) - 1
    assert "".join(t for t, m in chosen["segments"] if m == "reply") == "hot.<|im_end|>"


# -- the template lint ---------------------------------------------------------------------------------------------

def test_a_tokenizer_without_eos_is_warned_with_the_fix(tiny_chat_llama, tmp_path):
    model = chat_model(tmp_path, tiny_chat_llama, "no-eos", eos_token=None)
    result = inspect.run(recipe(tmp_path, model, make_chat_rows(20)), n=1)
    warning = next(w for w in result["warnings"] if w["code"] == "no_eos")
    assert "never learns to stop" in warning["text"] and "eos_token in the model's tokenizer_config.json" in warning["fix"]


def test_replies_the_template_ends_with_another_token_than_eos_are_warned(tiny_chat_llama, tmp_path):
    # EOS is <|endoftext|> here, but ChatML closes turns with <|im_end|>: render adds EOS after the last reply only
    model = chat_model(tmp_path, tiny_chat_llama, "other-eos", eos_token="<|endoftext|>")
    result = inspect.run(recipe(tmp_path, model, multi_turn(10)), n=1)
    warning = next(w for w in result["warnings"] if w["code"] == "no_eos")
    # 10 rows, 1 held out for validation: 9 first replies close with <|im_end|> only
    assert warning["text"].startswith("9 of 18 replies (not cut) end without EOS ('<|endoftext|>') (they end with "
                                      "'<|im_end|>')")
    single = inspect.run(recipe(tmp_path, model, make_chat_rows(20), name="single"), n=1)
    assert "no_eos" not in codes(single)  # one reply per row: the EOS render adds closes each


def test_pad_equal_to_eos_is_a_warning_only_where_eos_carries_no_loss(tiny_chat_llama, tmp_path):
    same = chat_model(tmp_path, tiny_chat_llama, "pad-eos", pad_token="<|im_end|>")
    ok = inspect.run(recipe(tmp_path, same, make_chat_rows(20)), n=1)
    assert "pad_is_eos" not in codes(ok)  # collate masks padding by position: EOS keeps its loss, and we say so
    assert any("the pad token is EOS ('<|im_end|>'): harmless here" in note for note in ok["notes"])
    late = chat_model(tmp_path, tiny_chat_llama, "pad-eos-late", template=LATE_EOS, pad_token="<|im_end|>")
    result = inspect.run(recipe(tmp_path, late, multi_turn(10), name="multi"), n=1)
    warning = next(w for w in result["warnings"] if w["code"] == "pad_is_eos")
    assert "the EOS after 9 of 18 replies carries no loss" in warning["text"]  # 1 of 10 rows held out
    assert "pad token of its own" in warning["fix"]
    apart = chat_model(tmp_path, tiny_chat_llama, "late", template=LATE_EOS)  # pad is not EOS: the template alone
    assert "eos_masked" in codes(inspect.run(recipe(tmp_path, apart, multi_turn(10), name="multi2"), n=1))


def test_a_doubled_bos_is_warned(tiny_chat_llama, tmp_path):
    from tokenizers import processors

    out = tmp_path / "adds-bos"
    shutil.copytree(tiny_chat_llama, out)
    tok = AutoTokenizer.from_pretrained(tiny_chat_llama)
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                                  special_tokens=[("<|endoftext|>", 0)])
    tok.save_pretrained(out)
    # texts rendered by a template that starts with BOS, then tokenized by a tokenizer that adds its own
    texts = [{"text": f"<|endoftext|>{r['text']}"} for r in make_rows(20)]
    result = inspect.run(recipe(tmp_path, out, texts, task="causal_lm"), n=1)
    warning = next(w for w in result["warnings"] if w["code"] == "double_bos")
    n = result["tokens"]["train"]["examples"]
    assert n > 0 and warning["text"].startswith(f"{n} of {n} train sequences start with BOS twice")
    plain = [{"text": r["text"]} for r in make_rows(20)]
    assert "double_bos" not in codes(inspect.run(recipe(tmp_path, out, plain, task="causal_lm", name="plain"), n=1))


def test_a_system_prompt_the_template_drops_is_warned(tiny_chat_llama, tmp_path):
    model = chat_model(tmp_path, tiny_chat_llama, "no-system", template=NO_SYSTEM)
    rows = [{"messages": [{"role": "system", "content": "Answer in French."}, *r["messages"]]} for r in make_chat_rows(12)]
    result = inspect.run(recipe(tmp_path, model, rows), n=1)
    warning = next(w for w in result["warnings"] if w["code"] == "system_dropped")
    n = result["tokens"]["train"]["examples"]
    assert n > 0 and warning["text"].startswith(f"the template drops the system turn of {n} of {n} rows")
    assert "system_dropped" not in codes(inspect.run(recipe(tmp_path, tiny_chat_llama, rows, name="kept"), n=1))


def test_a_generation_prompt_that_differs_from_training_is_warned(tiny_chat_llama, tmp_path):
    model = chat_model(tmp_path, tiny_chat_llama, "space", template=SPACE_PROMPT)
    # the tokenizer has " opposite" as one token: training reads "assistant:" + " opposite", generate feeds "assistant: "
    rows = distinct_rows(20, reply="opposite of {a} is {b}.")
    result = inspect.run(recipe(tmp_path, model, rows), n=1)
    warning = next(w for w in result["warnings"] if w["code"] == "generation_prompt")
    n = result["tokens"]["train"]["examples"]
    assert warning["text"].startswith(f"the prompt `tunelab generate` feeds differs from the tokens training continues "
                                      f"in {n} of {n} rows")
    assert re.search(r"training has '[^']*: opposite[^']*', generate feeds '[^']*: '\)", warning["text"])
    # the check compares what training saw with what generate feeds: the fixture's own template passes it
    assert "generation_prompt" not in codes(inspect.run(recipe(tmp_path, tiny_chat_llama, make_chat_rows(20),
                                                               name="chatml"), n=1))


def test_cut_replies_and_prompts_with_no_room_are_warned(tiny_chat_llama, tmp_path):
    long_reply = [{"messages": [{"role": "user", "content": f"Say it {i}."},
                                {"role": "assistant", "content": "hot cold " * 40}]} for i in range(10)]
    result = inspect.run(recipe(tmp_path, tiny_chat_llama, long_reply, "data.max_length=32"), n=1)
    warning = next(w for w in result["warnings"] if w["code"] == "reply_cut")
    assert warning["text"].startswith("9 train replies are longer than data.max_length=32")  # 1 of 10 held out
    assert result["lengths"]["train"]["over_max_length"] == 9 and result["lengths"]["train"]["share_cut"] == 1.0
    long_prompt = [{"messages": [{"role": "user", "content": f"{i} " + "hot cold " * 40},
                                 {"role": "assistant", "content": "Yes."}]} for i in range(10)]
    result = inspect.run(recipe(tmp_path, tiny_chat_llama, long_prompt, "data.max_length=32", name="prompt"), n=1)
    assert next(w for w in result["warnings"] if w["code"] == "no_room")["text"].startswith("9 train prompts are")
    # dpo stops training on such a pair; inspect says so and shows the rest as data.truncation=drop would
    pairs = [{"prompt": f"{i} " + "hot cold " * 40, "chosen": "Yes.", "rejected": "No."} for i in range(10)]
    result = inspect.run(recipe(tmp_path, tiny_chat_llama, pairs, "data.max_length=32", task="dpo", name="dpo"), n=1)
    warning = next(w for w in result["warnings"] if w["code"] == "no_room")
    assert "leaving no room for the reply" in warning["text"] and "data.truncation=drop" in warning["fix"]


# -- dropped rows --------------------------------------------------------------------------------------------------

def test_rows_repeated_on_purpose_are_warned_in_inspect_and_in_training(tiny_chat_llama, tmp_path, capsys):
    rows = distinct_rows(10)
    cfg = recipe(tmp_path, tiny_chat_llama, rows * 16)
    result = inspect.run(cfg, n=1)
    warning = next(w for w in result["warnings"] if w["code"] == "dropped_share")
    assert warning["text"] == "train: cleaning dropped 150 of 160 rows (94%: 150 duplicate)"
    assert "data.dedupe=false" in warning["fix"]
    assert "data.dedupe=false" in inspect.format_text(result)
    capsys.readouterr()
    tunelab.train(None, [f"model.path={tiny_chat_llama}", f"data.train={tmp_path / 'train.jsonl'}", "task.type=sft",
                         "method.name=lora", "train.max_steps=1", "eval.samples=0", "eval.base=false",
                         f"output_dir={tmp_path / 'trained'}"])
    printed = capsys.readouterr().out
    assert "warning: cleaning dropped 150 of 160 rows (94%: 150 duplicate); if the repetition is intended " \
           "(upsampling), keep those rows with data.dedupe=false" in printed
    kept = inspect.run(recipe(tmp_path, tiny_chat_llama, rows * 16, "data.dedupe=false", name="kept"), n=1)
    assert "dropped_share" not in codes(kept) and kept["tokens"]["train"]["examples"] + \
        kept["tokens"]["validation"]["examples"] == 160


# -- encoder tasks: mixes, lengths, the share cut ------------------------------------------------------------------

def expected_lengths(lengths: list[int], max_length: int) -> dict:
    s = sorted(lengths)
    at = lambda q: s[-(-q * len(s) // 100) - 1]
    over = sum(x > max_length for x in s)
    return {"sequences": len(s), "percentiles": {"p50": at(50), "p90": at(90), "p99": at(99), "max": s[-1]},
            "over_max_length": over, "share_cut": round(over / len(s), 4)}


def test_classification_and_regression_show_label_mixes_and_token_lengths(tiny_bert, tmp_path):
    rows = make_rows(120, seed=2)
    rows += [{"text": " ".join(["great"] * 30), "label": "pos"}]  # one text longer than max_length
    cfg = recipe(tmp_path, tiny_bert, rows, "data.max_length=16", task="classification")
    result = inspect.run(cfg, n=2)
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    splits, _ = tasks.get("classification").load_splits(cfg, cfg.train.seed)
    for name, split in splits.items():
        assert result["mix"][name]["labels"] == dict(
            sorted(((lab, sum(r["label"] == lab for r in split)) for lab in {r["label"] for r in split}),
                   key=lambda kv: -kv[1]))
        assert result["lengths"][name] == expected_lengths([len(tok(r["text"])["input_ids"]) for r in split], 16)
    assert result["lengths"]["train"]["over_max_length"] + result["lengths"]["validation"]["over_max_length"] == 1
    assert result["examples"][0]["target"] in ("pos", "neg") and result["weights_loaded"] is False
    scores = [{"text": r["text"], "label": i / 10} for i, r in enumerate(make_rows(50, seed=4))]
    result = inspect.run(recipe(tmp_path, tiny_bert, scores, task="regression", name="scores"), n=1)
    targets = sorted(float(r["label"]) for r in tasks.get("regression").load_splits(
        recipe(tmp_path, tiny_bert, scores, task="regression", name="scores"), 42)[0]["train"])
    assert result["mix"]["train"]["targets"]["min"] == targets[0]
    assert result["mix"]["train"]["targets"]["max"] == targets[-1]
    assert result["mix"]["train"]["targets"]["p50"] == targets[len(targets) // 2]


def test_ner_shows_entities_per_split_and_subword_lengths(tiny_bert, tmp_path):
    sentences = make_sentences(60, seed=1)
    write_jsonl_tokens(tmp_path / "ner.jsonl", sentences)
    cfg = config.load(None, [f"model.path={tiny_bert}", f"data.train={tmp_path / 'ner.jsonl'}",
                             "task.type=token_classification", "method.name=lora", "data.max_length=12"])
    result = inspect.run(cfg, n=2)
    splits, _ = tasks.get("token_classification").load_splits(cfg, cfg.train.seed)
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    for name, split in splits.items():
        counts = {}
        for r in split:
            for t in r["tags"]:
                if t.startswith("B-"):
                    counts[t[2:]] = counts.get(t[2:], 0) + 1
        assert result["mix"][name]["entities"] == dict(sorted(counts.items(), key=lambda kv: -kv[1]))
        lengths = [len(tok(r["tokens"], is_split_into_words=True)["input_ids"]) for r in split]
        assert result["lengths"][name] == expected_lengths(lengths, 12)
    assert result["lengths"]["train"]["share_cut"] > 0  # the sentences are longer than 12 subwords
    marked = [m for ex in result["examples"] for t, m in ex["parts"][0]["segments"] if m]
    assert marked and all(m[:2] in ("B-", "I-") for m in marked)  # tagged subwords carry their tag; O is unmarked


def test_qa_shows_answerable_questions_and_window_lengths(tiny_bert, tmp_path):
    rows = flat_rows(make_paragraphs(12, seed=2), layout="list")
    cfg = recipe(tmp_path, tiny_bert, rows, "data.max_length=48", task="qa")
    result = inspect.run(cfg, n=2)
    splits, _ = tasks.get("qa").load_splits(cfg, cfg.train.seed)
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    for name, split in splits.items():
        answerable = sum(bool(r["answers"]) for r in split)
        assert result["mix"][name]["answers"] == {"answerable": answerable, "unanswerable": len(split) - answerable}
        lengths = [len(tok(r["question"], r["context"])["input_ids"]) for r in split]
        assert result["lengths"][name] == expected_lengths(lengths, 48)
    shown = [ex for ex in result["examples"] if ex["parts"][0]["marked"]]
    assert shown
    for ex in shown:  # the marked span is the answer, as the tokenizer reads it (the tiny vocabulary has no digits)
        answer = "".join(t for t, m in ex["parts"][0]["segments"] if m == "answer").strip()
        golds = {tok.decode(tok(a, add_special_tokens=False)["input_ids"]) for a in ex["target"].split("; ")}
        assert answer in golds


def test_embedding_shows_its_pairs_and_the_lengths_of_every_side(tiny_bert, tmp_path):
    rows = [{"anchor": r["text"], "positive": r["text"][::-1], "neg": "dull"} for r in make_rows(40, seed=3)]
    cfg = recipe(tmp_path, tiny_bert, rows, "data.negative_field=neg", task="embedding")
    result = inspect.run(cfg, n=1)
    splits, _ = tasks.get("embedding").load_splits(cfg, cfg.train.seed)
    train = splits["train"]
    assert result["mix"]["train"]["pairs"] == {"rows": len(train), "distinct_anchors": len({r["anchor"] for r in train}),
                                               "with_hard_negative": len(train)}
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    lengths = [len(tok(r[s])["input_ids"]) for r in train for s in ("anchor", "positive", "negative")]
    assert result["lengths"]["train"] == expected_lengths(lengths, 64)
    assert [p["name"] for p in result["examples"][0]["parts"]] == ["anchor", "positive", "negative"]


# -- the command: piped, coloured, as a page ------------------------------------------------------------------------

def test_piped_output_marks_with_brackets_and_a_terminal_gets_colour(tiny_chat_llama, tmp_path, cli_run, monkeypatch):
    cfg_path = tmp_path / "sft.yaml"
    train = write_jsonl(tmp_path / "chat.jsonl", make_chat_rows(20))
    cfg_path.write_text(f"model: {{path: {tiny_chat_llama}}}\ndata: {{train: {train}, max_length: 64}}\n"
                        f"task: {{type: sft}}\nmethod: {{name: lora}}\n", encoding="utf-8")
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    piped = cli_run("data", "inspect", cfg_path, "-n", "2")
    assert piped.code == 0, piped.err
    assert "\x1b[" not in piped.out
    assert len(re.findall(r"«The opposite of \w+ is \w+\.<\|im_end\|>»", piped.out)) == 2
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich treats the output as a terminal
    coloured = cli_run("data", "inspect", cfg_path, "-n", "2")
    assert coloured.code == 0, coloured.err
    assert "\x1b[" in coloured.out and "«The opposite" not in coloured.out
    assert cli_run("data", "inspect", cfg_path, "--split", "test").code == 2


@pytest.mark.browser
def test_the_html_page_shows_the_examples_and_renders_in_chromium(chromium, tiny_chat_llama, tmp_path,  # noqa: F811
                                                                  cli_run):
    cfg_path = tmp_path / "sft.yaml"
    train = write_jsonl(tmp_path / "chat.jsonl", make_chat_rows(30) * 2)
    cfg_path.write_text(f"model: {{path: {tiny_chat_llama}}}\ndata: {{train: {train}, max_length: 64}}\n"
                        f"task: {{type: sft}}\nmethod: {{name: lora}}\n", encoding="utf-8")
    page = tmp_path / "inspect.html"
    result = cli_run("data", "inspect", cfg_path, "-n", "3", "--html", page)
    assert result.code == 0, result.err
    html = page.read_text(encoding="utf-8")
    assert len(re.findall(r"<mark style='background:#b7ebc0'>The opposite of \w+ is \w+\.&lt;\|im_end\|&gt;</mark>",
                          html)) == 3
    assert "data.dedupe=false" in html  # the rows repeat twice: the warning is on the page too
    problems, _ = _page_problems(chromium, page, tmp_path)
    assert problems == []
    assert not _blank(_screenshot(chromium, page, tmp_path))
    again = cli_run("data", "inspect", cfg_path, "--html", page)
    assert again.code == 2 and "--overwrite" in again.err and page.read_text(encoding="utf-8") == html


def test_the_file_form_still_reports_a_data_file(sentiment_files, cli_run, tmp_path):
    rows = make_rows(20, seed=1)
    path = write_jsonl(tmp_path / "dup.jsonl", rows + rows + [random.Random(0).choice(rows)])
    out = cli_run("data", "inspect", path)
    assert out.code == 0 and "rows read: 41, dropped: 21" in out.out and "data.dedupe=false" in out.out
    ok = cli_run("data", "inspect", sentiment_files["train"], "--json")
    assert ok.code == 0 and json.loads(ok.out)["rows_read"] == 240


def test_mlm_marks_the_masked_positions_with_the_token_each_hides(tiny_bert, tmp_path):
    texts = [{"text": r["text"]} for r in make_rows(60, seed=6)]
    cfg = recipe(tmp_path, tiny_bert, texts, "task.new_mlm_head=true", "data.max_length=16", task="mlm")
    result = inspect.run(cfg, n=3, split="validation")  # validation rows are masked once, in encode (seeded)
    task = tasks.get("mlm")
    splits, _ = task.load_splits(cfg, cfg.train.seed)
    info = task.label_info(splits, cfg)
    _, tok = task.build_model(cfg.model, info)
    feats, _ = task.encode(splits["validation"], tok, info, 16)
    assert len(result["examples"]) == 3 and any(ex["parts"][0]["marked"] for ex in result["examples"])
    for ex, f in zip(result["examples"], feats):
        part = ex["parts"][0]
        assert part["ids"] == f["input_ids"]
        assert part["marked"] == [t for t, x in enumerate(f["labels"]) if x != -100]
        hidden = [m[1:] for _, m in part["segments"] if m]
        assert hidden == [tok.convert_ids_to_tokens(x) for x in f["labels"] if x != -100]
