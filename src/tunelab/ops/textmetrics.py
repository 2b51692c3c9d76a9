"""Scores for generated text against a reference: exact match, token F1, ROUGE-L, corpus BLEU, reply length.

ROUGE-L reproduces `rouge_score.rouge_scorer.RougeScorer(["rougeL"])` (default tokenizer, no stemming) and BLEU
reproduces `sacrebleu.corpus_bleu` with its defaults (13a tokenizer, exp smoothing, 4-grams, one reference),
float for float, so tunelab needs neither package; tests/test_generative_eval.py checks the equality.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", flags=re.UNICODE)


def normalize(text: str) -> str:
    """SQuAD's normalisation: lowercase, drop ASCII punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's word-overlap F1; two empty sides agree (1.0), one empty side scores 0."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if not same:
        return 0.0
    p, r = same / len(pred), same / len(ref)
    return 2 * p * r / (p + r)


# rouge-score's default tokenizer: lowercase, every run of non [a-z0-9] characters is a separator.
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    return [t for t in _NON_ALNUM.sub(" ", text.lower()).split() if t]


def _lcs_length(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of one reply against its reference (rouge-score's `rougeL`, `fmeasure`)."""
    target, pred = rouge_tokens(reference), rouge_tokens(prediction)
    if not target or not pred:
        return 0.0
    lcs = _lcs_length(target, pred)
    precision, recall = lcs / len(pred), lcs / len(target)
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


# sacrebleu's 13a tokenizer (mteval-v13a): the regular expressions and their order are the reference's.
_BLEU_RES = (
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
)


def bleu_tokens(text: str) -> list[str]:
    line = text.rstrip().replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _BLEU_RES:
        line = pattern.sub(repl, line)
    return line.split()


def _ngrams(tokens: list[str], order: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, order + 1) for i in range(len(tokens) - n + 1))


def corpus_bleu(predictions: list[str], references: list[str], order: int = 4) -> float:
    """Corpus BLEU on a 0-100 scale, one reference per reply (sacrebleu.corpus_bleu's `.score`)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    correct, total = [0] * order, [0] * order
    sys_len = ref_len = 0
    for pred, ref in zip(predictions, references):
        hyp, gold = bleu_tokens(pred), bleu_tokens(ref)
        sys_len += len(hyp)
        ref_len += len(gold)
        gold_ngrams = _ngrams(gold, order)
        for ngram, count in _ngrams(hyp, order).items():
            total[len(ngram) - 1] += count
            if ngram in gold_ngrams:
                correct[len(ngram) - 1] += min(count, gold_ngrams[ngram])
    bp = 1.0
    if sys_len < ref_len:
        bp = math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0
    if not any(correct):
        return 0.0
    precisions = [0.0] * order
    smooth = 1.0
    for n in range(order):
        if total[n] == 0:
            break
        if correct[n] == 0:
            # sacrebleu's "exp" smoothing (NIST): each further n-gram order with no match halves its credit.
            smooth *= 2
            precisions[n] = 100.0 / (smooth * total[n])
        else:
            precisions[n] = 100.0 * correct[n] / total[n]
    # sacrebleu floors log(0) to -9999999999 rather than raising, so an order never reached scores ~0.
    return bp * math.exp(sum(math.log(p) if p else -9999999999 for p in precisions) / order)


def reply_scores(predictions: list[str], references: list[str], lengths: list[int], ended: list[bool]) -> dict:
    """The generation figures of one split: means of the per-reply scores, corpus BLEU, length and EOS share.

    `lengths` counts each reply's generated tokens; `ended` says whether it stopped at EOS (not the token limit).
    """
    n = len(predictions)
    if not (n == len(references) == len(lengths) == len(ended)):
        raise ValueError("predictions, references, lengths and ended must have one entry per row")
    if n == 0:
        return {"examples": 0}
    return {
        "examples": n,
        "exact_match": sum(map(exact_match, predictions, references)) / n,
        "token_f1": sum(map(token_f1, predictions, references)) / n,
        "rougeL": sum(map(rouge_l, predictions, references)) / n,
        "bleu": corpus_bleu(predictions, references),
        "mean_length": sum(lengths) / n,
        "ended_with_eos": sum(map(bool, ended)) / n,
    }
