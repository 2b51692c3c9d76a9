"""Generative evaluation: text metrics equal the reference packages; base vs tuned replies through a run."""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_chat_rows, write_jsonl

import tunelab
from tunelab import compare, config, predict
from tunelab.errors import TunelabError
from tunelab.ops import textmetrics
from tunelab.report import markup
from tunelab.report import run as run_report
from tunelab.tasks import causal_lm

_WORDS = ["the", "a", "cat", "Cat", "sat", "on", "mat", "3.5", "1,000", "x-ray", "don't", "naïve", "日本", "&amp;",
          "Hello,", "world!", "(yes)", "<skipped>", "e.g.", "a.b", "--", "über", "İstanbul", "end.", "Q&A", "\n", "-\n"]


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(0, 12)))


def _pairs(seed: int, n: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = [(_sentence(rng), _sentence(rng)) for _ in range(n)]
    # Replies that copy part of their reference, so high-order n-grams and long common subsequences occur.
    pairs += [(ref[: rng.randint(0, len(ref))] + _sentence(rng), ref) for _, ref in pairs[: n // 2]]
    return pairs + [("", ""), ("", "the cat"), ("the cat", ""), ("...", "!!!"), ("  ", "a")]


def test_rouge_l_equals_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for pred, ref in _pairs(0, 400):
        assert textmetrics.rouge_l(pred, ref) == scorer.score(ref, pred)["rougeL"].fmeasure, (pred, ref)


def test_corpus_bleu_equals_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    pairs = _pairs(1, 300)
    for start in range(0, len(pairs), 7):
        chunk = pairs[start:start + 1 + start % 13]
        preds, refs = [p for p, _ in chunk], [r for _, r in chunk]
        assert textmetrics.corpus_bleu(preds, refs) == sacrebleu.corpus_bleu(preds, [refs]).score, chunk
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    assert textmetrics.corpus_bleu(preds, refs) == sacrebleu.corpus_bleu(preds, [refs]).score


def test_a_planted_off_by_one_is_caught(monkeypatch):
    """The equality tests have teeth: an LCS or n-gram count one off no longer matches the references."""
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    sacrebleu = pytest.importorskip("sacrebleu")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pairs = _pairs(2, 100)
    real_lcs, real_ngrams = textmetrics._lcs_length, textmetrics._ngrams
    monkeypatch.setattr(textmetrics, "_lcs_length", lambda a, b: real_lcs(a, b[1:]))
    assert any(textmetrics.rouge_l(p, r) != scorer.score(r, p)["rougeL"].fmeasure for p, r in pairs)
    monkeypatch.setattr(textmetrics, "_ngrams", lambda tokens, order: real_ngrams(tokens, order - 1))
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    assert textmetrics.corpus_bleu(preds, refs) != sacrebleu.corpus_bleu(preds, [refs]).score


def test_exact_match_and_token_f1_follow_squad():
    assert textmetrics.exact_match("The Cat!", "cat") == 1.0
    assert textmetrics.exact_match("a cat", "dog") == 0.0
    assert textmetrics.token_f1("", "") == 1.0
    assert textmetrics.token_f1("cat", "") == 0.0
    # 2 shared of 3 predicted and 4 reference tokens: p = 2/3, r = 1/2.
    assert textmetrics.token_f1("black cat sat", "the cat sat down there") == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))


def test_reply_scores_counts_eos_share_and_length():
    out = textmetrics.reply_scores(["a b", "c"], ["a b", "d"], lengths=[3, 8], ended=[True, False])
    assert out["examples"] == 2 and out["exact_match"] == 0.5
    assert out["mean_length"] == 5.5 and out["ended_with_eos"] == 0.5


# -- generation on a tiny chat model ----------------------------------------------------------------------------------

SFT_INFO = {"task": "sft", "template": "chat", "train_on_prompt": False, "truncation": "cut"}


def _chat_model(path):
    cfg = config.validate({"model": {"path": str(path)}, "data": {"train": "x.jsonl"}, "task": {"type": "sft"}})
    model, tok = causal_lm.build_model(cfg.model, SFT_INFO)
    return model.eval(), tok


def test_batched_generation_equals_one_prompt_at_a_time(tiny_chat_llama):
    model, tok = _chat_model(tiny_chat_llama)
    prompts = [p["prompt"] for p in causal_lm.generation_rows(make_chat_rows(7, seed=5), tok, SFT_INFO)]
    prompts[3] = causal_lm.prompt_text([{"role": "user", "content": "What is the opposite of a very long word, hot, "
                                                                    "big and up?"}], tok, SFT_INFO)  # longer: padding
    batched = causal_lm.generate_replies(model, tok, prompts, SFT_INFO, max_new_tokens=12, batch_size=4)
    single = causal_lm.generate(model, tok, prompts, SFT_INFO, max_new_tokens=12)
    assert [r["reply"] for r in batched] == single
    assert len({len(p) for p in prompts}) > 1


def test_eos_share_counts_a_reply_that_stops_and_one_cut_at_the_limit(tiny_chat_llama):
    """A model whose only possible next token is EOS stops at once; one that can never say EOS runs to the limit."""
    model, tok = _chat_model(tiny_chat_llama)
    prompt = causal_lm.generation_rows(make_chat_rows(1), tok, SFT_INFO)[0]["prompt"]
    head = model.get_output_embeddings()
    bias = torch.full((len(tok),), -1e4)
    bias[tok.eos_token_id] = 1e4
    handle = head.register_forward_hook(lambda m, i, o: o + bias)
    stopped = causal_lm.generate_replies(model, tok, [prompt], SFT_INFO, max_new_tokens=6)
    handle.remove()
    bias = torch.zeros(len(tok))
    bias[tok.eos_token_id] = -1e4
    handle = head.register_forward_hook(lambda m, i, o: o + bias)
    cut = causal_lm.generate_replies(model, tok, [prompt], SFT_INFO, max_new_tokens=6)
    handle.remove()
    assert stopped == [{"reply": "", "tokens": 0, "ended": True}]
    assert cut[0]["tokens"] == 6 and cut[0]["ended"] is False
    figures = textmetrics.reply_scores([stopped[0]["reply"], cut[0]["reply"]], ["a", "b"], [0, 6], [True, False])
    assert figures["ended_with_eos"] == 0.5 and figures["mean_length"] == 3.0


def _run(tmp_path, model_path, *extra):
    train = write_jsonl(tmp_path / "train.jsonl", make_chat_rows(160, seed=3))
    test = write_jsonl(tmp_path / "test.jsonl", make_chat_rows(20, seed=9))
    return tunelab.train(None, [f"model.path={model_path}", f"data.train={train}", f"data.test={test}",
                                "task.type=sft", "data.dedupe=false", "data.max_length=64", "train.batch_size=8",
                                "train.lr=1e-2", "eval.samples=1", "eval.max_new_tokens=12", "eval.generate=4",
                                "method.name=lora", "method.target_modules=all-linear", "train.max_steps=30",
                                f"output_dir={tmp_path / 'run'}", *extra])


def test_a_run_with_eval_generate_scores_base_and_tuned_replies(tiny_chat_llama, tmp_path, capsys, cli_run):
    run = _run(tmp_path, tiny_chat_llama)
    gen = run.summary["generation"]
    assert set(gen) == {"base", "tuned"} and set(gen["tuned"]) == {"validation", "test"}
    rows = json.loads((run.dir / "generations.json").read_text())
    for split in ("validation", "test"):
        assert len(rows[split]) == 4
        for side in ("base", "tuned"):
            replies = [r[f"{side}_reply"] for r in rows[split]]
            refs = [r["reference"] for r in rows[split]]
            figures = gen[side][split]
            assert figures["examples"] == 4
            assert figures["rougeL"] == sum(map(textmetrics.rouge_l, replies, refs)) / 4
            assert figures["bleu"] == textmetrics.corpus_bleu(replies, refs)
            assert figures["ended_with_eos"] == sum(r[f"{side}_ended"] for r in rows[split]) / 4
            assert figures["mean_length"] == sum(r[f"{side}_tokens"] for r in rows[split]) / 4
    # the same prompts, answered by the saved run, give the tuned replies
    model = tunelab.load(run.dir)
    again = model.task.generate(model.model, model.tokenizer, [r["prompt"] for r in rows["validation"]], model.info,
                                12, device=model.device)
    assert again == [r["tuned_reply"] for r in rows["validation"]]
    assert "generation (validation, 4 rows): rougeL" in capsys.readouterr().out
    # report.html: the figures and the prompts with both replies
    page = run_report.write_run(run.dir).read_text()
    section = page[page.index("<h2>Generation</h2>"):]
    section = section[: section.index("</section>")]
    assert f"<td class='num'>{markup.fmt(gen['tuned']['validation']['rougeL'])}</td>" in section
    for r in rows["validation"]:
        for key in ("reference", "base_reply", "tuned_reply"):
            assert markup.esc(markup.clip(r[key], markup.CLIP)) in section

    # `tunelab eval RUN FILE --generate`: the test file's first rows answered by the saved run, as in the run
    result = cli_run("eval", run.dir, tmp_path / "test.jsonl", "--generate", "-n", "4", "--max-new-tokens", "12",
                     "-o", tmp_path / "gen.json")
    assert result.code == 0, result.err
    scored = json.loads((tmp_path / "gen.json").read_text())
    assert [r["reply"] for r in scored["replies"]] == [r["tuned_reply"] for r in rows["test"]]
    assert {k: scored[k] for k in gen["tuned"]["test"]} == gen["tuned"]["test"]
    assert f"rougeL {gen['tuned']['test']['rougeL']:.4f}" in result.out
    refused = cli_run("eval", run.dir, tmp_path / "test.jsonl", "-n", "4")
    assert refused.code == 2 and "-n applies to generated replies: add --generate" in refused.err


def test_compare_shows_the_generation_columns(tmp_path, tiny_chat_llama):
    train = write_jsonl(tmp_path / "train.jsonl", make_chat_rows(60, seed=3))
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(json.dumps({  # JSON is YAML
        "model": {"path": str(tiny_chat_llama), "device": "cpu"}, "task": {"type": "sft"},
        "data": {"train": str(train), "max_length": 48, "dedupe": False}, "method": {"name": "lora", "r": 4},
        "train": {"batch_size": 8}, "eval": {"samples": 0, "forgetting": "none", "generate": 3, "max_new_tokens": 6}}))
    out = tmp_path / "cmp"
    (row,) = compare.run(str(recipe), [], ["lora"], str(out), steps=2, echo=lambda m: None)
    summary = json.loads((out / "runs" / "lora" / "summary.json").read_text())
    figures = summary["generation"]
    assert row["generation"]["split"] == "validation"
    assert row["generation"]["rougeL_tuned"] == figures["tuned"]["validation"]["rougeL"]
    assert row["generation"]["ended_with_eos_base"] == figures["base"]["validation"]["ended_with_eos"]
    with (out / "compare.csv").open() as f:
        (table,) = list(csv.DictReader(f))
    assert float(table["token_f1_tuned"]) == figures["tuned"]["validation"]["token_f1"]
    assert "rougeL (base → tuned)" in (out / "compare.md").read_text()
    assert "<th>rougeL tuned</th>" in (out / "report.html").read_text()


def test_eval_generate_is_refused_for_a_task_that_writes_no_replies():
    with pytest.raises(TunelabError, match=r"eval.generate=4 .*sft, causal_lm or dpo; a classification run"):
        config.validate({"model": {"path": "m"}, "data": {"train": "x.jsonl"}, "task": {"type": "classification"},
                         "eval": {"generate": 4}})


def test_a_dpo_run_scores_its_replies_against_the_chosen_ones(tmp_path, tiny_chat_llama):
    rng = random.Random(4)
    pairs = []
    for i in range(40):
        a, b = rng.choice([("hot", "cold"), ("up", "down"), ("big", "small")])
        pairs.append({"prompt": f"What is the opposite of {a}, {i}?", "chosen": f"The opposite of {a} is {b}.",
                      "rejected": f"I do not know {a}."})
    train = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    run = tunelab.train(None, [f"model.path={tiny_chat_llama}", f"data.train={train}", "task.type=dpo",
                               "method.name=lora", "train.batch_size=8", "train.max_steps=2", "eval.samples=0",
                               "data.max_length=64", "eval.forgetting=none", "eval.generate=3", "eval.max_new_tokens=5",
                               f"output_dir={tmp_path / 'dpo'}"])
    rows = json.loads((run.dir / "generations.json").read_text())["validation"]
    assert len(rows) == 3 and all(r["reference"].startswith("The opposite of ") for r in rows)
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") for r in rows)  # rendered with the chat template
    assert run.summary["generation"]["tuned"]["validation"]["rougeL"] == \
        sum(textmetrics.rouge_l(r["tuned_reply"], r["reference"]) for r in rows) / 3


def test_a_reward_run_judges_base_and_tuned_replies(tmp_path, tiny_chat_llama, cli_run):
    rng = random.Random(6)
    pairs = [{"prompt": f"question {i} about tea", "chosen": "thanks please kind", "rejected": rng.choice(["no go", "away"])}
             for i in range(40)]
    reward_train = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    judge = tunelab.train(None, [f"model.path={tiny_chat_llama}", f"data.train={reward_train}", "task.type=reward",
                                 "method.name=lora", "method.r=4", "train.batch_size=8", "train.max_steps=2",
                                 "eval.samples=0", "data.max_length=64", f"output_dir={tmp_path / 'rm'}"])
    run = _run(tmp_path, tiny_chat_llama, f"eval.judge={judge.dir}", "train.max_steps=4")
    rows = json.loads((run.dir / "generations.json").read_text())
    scorer = tunelab.load(judge.dir)
    for split, verdict in run.summary["generation"]["judge"].items():
        prompts = [r["messages"] for r in rows[split]]  # the conversation before the reply, as the judge reads it
        scores = {side: [s["score"] for s in scorer.predict([{"prompt": p, "response": r[f"{side}_reply"]}
                                                              for p, r in zip(prompts, rows[split])])]
                  for side in ("base", "tuned")}
        assert [r["tuned_judge"] for r in rows[split]] == scores["tuned"]
        assert verdict["base_mean"] == sum(scores["base"]) / 4 and verdict["tuned_mean"] == sum(scores["tuned"]) / 4
        wins = sum((t > b) + 0.5 * (t == b) for b, t in zip(scores["base"], scores["tuned"]))
        assert verdict["win_rate"] == wins / 4
    assert "judge: base mean" in run_report.write_run(run.dir).read_text()
    # `tunelab eval RUN FILE --generate --judge RM`: the reward run scores the saved run's replies to the test rows
    result = cli_run("eval", run.dir, tmp_path / "test.jsonl", "--generate", "-n", "4", "--max-new-tokens", "12",
                     "--judge", judge.dir, "-o", tmp_path / "judged.json")
    assert result.code == 0, result.err
    scored = json.loads((tmp_path / "judged.json").read_text())
    assert [r["judge"] for r in scored["replies"]] == [r["tuned_judge"] for r in rows["test"]]
    assert scored["judge_mean"] == run.summary["generation"]["judge"]["test"]["tuned_mean"]
    # a run that scores no replies is refused as a judge, and as a GRPO reward, naming the setting
    (tmp_path / "again").mkdir()
    with pytest.raises(TunelabError, match=r"eval.judge: '.*' is a sft run, not a reward model .*remove eval.judge"):
        _run(tmp_path / "again", tiny_chat_llama, f"eval.judge={run.dir}", "train.max_steps=1")
    with pytest.raises(TunelabError, match=r"task.reward_model: '.*' is a sft run, not a reward model \(task.type reward\)\.$"):
        predict.reward_scorer(str(run.dir), "task.reward_model")


def test_eval_judge_needs_eval_generate():
    with pytest.raises(TunelabError, match=r"eval.judge='runs/rm' scores generated replies, but eval.generate is 0"):
        config.validate({"model": {"path": "m"}, "data": {"train": "x.jsonl"}, "task": {"type": "sft"},
                         "eval": {"judge": "runs/rm"}})


JUDGES = """
CALLS = []

def length(prompts, replies, references):
    CALLS.append((prompts, replies, references))
    return [len(r) for r in replies]

def raises(prompts, replies, references):
    return [1.0 / 0 for r in replies]

def too_few(prompts, replies, references):
    return [1.0]

def nan(prompts, replies, references):
    return [float("nan") for r in replies]

def words(prompts, replies, references):
    return ["good" for r in replies]

def one_number(prompts, replies, references):
    return 0.5

def two_arguments(prompts, completions):
    return [1.0 for c in completions]

not_a_function = 3
"""


def _judges(tmp_path, monkeypatch, name: str) -> str:
    """A module `name` of JUDGES on sys.path for this test only (each test its own name: imports are cached)."""
    folder = tmp_path / "judges"
    folder.mkdir()
    (folder / f"{name}.py").write_text(JUDGES)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def test_a_python_function_judges_base_and_tuned_replies(tmp_path, tiny_chat_llama, monkeypatch, capsys,
                                                          cli_run):
    module = _judges(tmp_path, monkeypatch, "judges_scored")
    run = _run(tmp_path, tiny_chat_llama, f"eval.judge={module}:length", "train.max_steps=4")
    console = capsys.readouterr().out
    rows = json.loads((run.dir / "generations.json").read_text())
    verdicts = run.summary["generation"]["judge"]
    assert set(verdicts) == {"validation", "test"}
    for split, verdict in verdicts.items():
        scores = {side: [len(r[f"{side}_reply"]) for r in rows[split]] for side in ("base", "tuned")}
        assert [r["base_judge"] for r in rows[split]] == scores["base"]
        assert [r["tuned_judge"] for r in rows[split]] == scores["tuned"]
        assert verdict == {"examples": 4, "base_mean": sum(scores["base"]) / 4, "tuned_mean": sum(scores["tuned"]) / 4,
                           "win_rate": sum((t > b) + 0.5 * (t == b) for b, t in zip(scores["base"], scores["tuned"])) / 4}
        assert f"judge ({split}): mean score {verdict['base_mean']:.3f} -> {verdict['tuned_mean']:.3f}" in console
    # called once per side and split with the unrendered conversations, the replies and the references
    calls = sys.modules[module].CALLS
    expected = [([r["messages"] for r in rows[split]], [r[f"{side}_reply"] for r in rows[split]],
                 [r["reference"] for r in rows[split]]) for side in ("base", "tuned") for split in ("validation", "test")]
    assert [tuple(c) for c in calls] == expected
    assert all(m[-1]["role"] == "user" for prompts, _, _ in calls for m in prompts)
    page = run_report.write_run(run.dir).read_text()
    assert "judge: base mean" in page and markup.esc("the judge's score of each reply") in page
    assert "reward model's score" not in page  # the judge here is a function

    # `tunelab eval RUN FILE --generate --judge`: the same function scores the saved run's replies to the test rows,
    # which are the run's own tuned replies to them
    result = cli_run("eval", run.dir, tmp_path / "test.jsonl", "--generate", "-n", "4", "--max-new-tokens", "12",
                     "--judge", f"{module}:length", "-o", tmp_path / "judged.json")
    assert result.code == 0, result.err
    scored = json.loads((tmp_path / "judged.json").read_text())
    assert [r["reply"] for r in scored["replies"]] == [r["tuned_reply"] for r in rows["test"]]
    assert [r["judge"] for r in scored["replies"]] == [r["tuned_judge"] for r in rows["test"]]
    assert scored["judge_mean"] == verdicts["test"]["tuned_mean"]
    assert f"judge_mean {verdicts['test']['tuned_mean']:.4f}" in result.out
    assert calls[-1] == ([r["messages"] for r in rows["test"]], [r["tuned_reply"] for r in rows["test"]],
                         [r["reference"] for r in rows["test"]])


@pytest.mark.parametrize("judge, message", [
    ("judges_errors:nowhere", "eval.judge='judges_errors:nowhere' could not be loaded (AttributeError"),
    ("no_such_module_anywhere:score", "could not be loaded (ModuleNotFoundError: No module named "
                                      "'no_such_module_anywhere')"),
    ("BROKEN:f", "could not be loaded (SyntaxError"),
    ("judges_errors:not_a_function", "'not_a_function' is 3, not a function. Name a function(prompts, replies, "
                                     "references) that returns one number per reply."),
    ("runs/no_such_run", "eval.judge='runs/no_such_run' is neither an existing directory nor a Python function"),
    (":score", "eval.judge=':score' is neither an existing directory nor a Python function"),
    ("judges_errors:raises", "The judge eval.judge='judges_errors:raises' raised ZeroDivisionError: float division by zero "
                             "when judging the base model's replies to the validation prompts. The judge is called as "
                             "function(prompts, replies, references)"),
    ("judges_errors:too_few", "returned 1 value(s) for 4 replies when judging the base model's replies"),
    ("judges_errors:nan", "returned nan (float) for reply 1 of 4 when judging the base model's replies to the "
                          "validation prompts (reply "),
    ("judges_errors:words", "returned 'good' (str) for reply 1 of 4"),
    ("judges_errors:one_number", "returned 0.5 (float), not a list of numbers"),
    ("judges_errors:two_arguments", "raised TypeError: two_arguments() takes 2 positional arguments but 3 were given"),
])
def test_a_python_judge_that_fails_is_one_paragraph_before_training(tmp_path, tiny_chat_llama, monkeypatch, judge,
                                                                    message):
    _judges(tmp_path, monkeypatch, "judges_errors")
    (tmp_path / "broken.py").write_text("def f(prompts, replies, references):\n    return [1.0 for r in replies\n")
    judge = judge.replace("BROKEN", str(tmp_path / "broken.py"))
    with pytest.raises(TunelabError) as e:
        _run(tmp_path, tiny_chat_llama, f"eval.judge={judge}", "train.max_steps=1")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()  # stopped before the run had a directory: nothing was trained


@pytest.fixture(scope="module")
def sft_run(tiny_chat_llama, tmp_path_factory) -> Path:
    """One small finished sft run, for the tests that only read it."""
    d = tmp_path_factory.mktemp("sft")
    train = write_jsonl(d / "train.jsonl", make_chat_rows(16, seed=3))
    return tunelab.train(None, [f"model.path={tiny_chat_llama}", f"data.train={train}", "task.type=sft",
                                "data.max_length=48", "train.batch_size=8", "train.max_steps=1", "eval.samples=0",
                                "eval.forgetting=none", "method.name=lora", "method.r=4", f"output_dir={d / 'run'}"]).dir


@pytest.mark.parametrize("args, message", [
    (["--judge", "judges_cli:nowhere", "--generate"], "--judge='judges_cli:nowhere' could not be loaded "
                                                      "(AttributeError"),
    (["--judge", "judges_cli:too_few", "--generate"], "The judge --judge='judges_cli:too_few' returned 1 value(s) for "
                                                      "2 replies when judging the run's replies to the prompts of "),
    (["--judge", "no/such/run", "--generate"], "--judge='no/such/run' is neither an existing directory nor a Python "
                                               "function"),
    (["--judge", "judges_cli:length"], "--judge applies to generated replies: add --generate, or drop it."),
])
def test_eval_generate_judge_errors_are_one_paragraph(sft_run, tmp_path, monkeypatch, cli_run, args, message):
    module = _judges(tmp_path, monkeypatch, "judges_cli")
    test = write_jsonl(tmp_path / "test.jsonl", make_chat_rows(2, seed=9))
    result = cli_run("eval", sft_run, test, "-o", tmp_path / "judged.json", *args)
    assert result.code == 2 and result.err.startswith("error: ") and "Traceback" not in result.err, result.err
    assert message in " ".join(result.err.split()) and result.err.strip().count("\n") == 0, result.err
    assert not (tmp_path / "judged.json").exists()
    assert sys.modules.get(module) is None or not sys.modules[module].CALLS


def test_resume_does_not_run_a_function_judge_that_the_run_folder_names(tmp_path, tiny_chat_llama, monkeypatch,
                                                                          capsys):
    """A run folder's config.yaml (perhaps someone else's) is no opt-in to run code: --resume leaves its function
    judge out, says so and how to judge the replies, and finishes; the folder's file is not even imported. The
    judge's relative path was saved absolute."""
    imported = tmp_path / "IMPORTED"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "judges.py").write_text(f"from pathlib import Path\nPath({str(imported)!r}).write_text('ran')\n{JUDGES}")
    real, calls = causal_lm.loss, {"n": 0}

    def interrupted(*a, **kw):  # Ctrl-C during the third loss computation, after a checkpoint
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(causal_lm, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tiny_chat_llama, "eval.judge=judges.py:length", "train.max_steps=4", "train.checkpoint_every=1")
    monkeypatch.setattr(causal_lm, "loss", real)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["eval"]["judge"] == f"{tmp_path / 'judges.py'}:length"
    assert imported.read_text() == "ran"  # the recipe named it: the first run imported it
    imported.unlink()
    capsys.readouterr()

    run = tunelab.resume(tmp_path / "run")
    assert not imported.exists()
    assert set(run.summary["generation"]) == {"base", "tuned"} and run.summary["steps"] == 4
    rows = json.loads((run.dir / "generations.json").read_text())
    assert not any(k.endswith("_judge") for split in rows.values() for r in split for k in r)
    note = " ".join(capsys.readouterr().out.split())
    assert (f"names eval.judge='{tmp_path / 'judges.py'}:length', a Python function, and --resume does not run code "
            f"that a run folder names") in note
    assert f"`tunelab eval {tmp_path / 'run'} FILE --generate --judge {tmp_path / 'judges.py'}:length`" in note
