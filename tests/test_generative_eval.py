"""Generative evaluation: text metrics equal the reference packages; base vs tuned replies through a run."""

from __future__ import annotations

import random

import pytest

from tunelab.ops import textmetrics

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
    assert out["rows"] == 2 and out["exact_match"] == 0.5
    assert out["mean_length"] == 5.5 and out["ended_with_eos"] == 0.5
