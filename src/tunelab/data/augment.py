"""Text augmentation for classification (EDA: Wei & Zou 2019), applied to the training split only.

Each training example gets `data.augment_copies` altered copies, each made by one operation drawn from
`data.augment_ops`, changing about `data.augment_rate` of its words (at least one):
- delete: drop words at random (never all of them);
- swap: exchange two words' positions;
- insert: insert a copy of a word of the same sentence at a random position;
- synonym: replace a word by one of its nearest neighbours in the model's own input-embedding table (cosine,
  among whole-word tokens of 3+ letters). WordNet would need a data download that this machine cannot do; the
  embedding neighbours need nothing beyond the model being trained, and they are words the model knows.
Seeded by train.seed: the same config gives the same copies. Validation and test are never touched.
"""

from __future__ import annotations

import random

import torch

OPS = ("delete", "swap", "insert", "synonym")
NEIGHBOURS = 5  # a synonym is drawn from this many nearest words


class EmbeddingNeighbours:
    """Nearest whole-word tokens of a word in the model's input embeddings (cached per word)."""

    def __init__(self, model, tokenizer):
        self.tok = tokenizer
        weight = model.get_input_embeddings().weight.detach().float()
        words = {}
        for token, i in tokenizer.get_vocab().items():
            text = tokenizer.convert_tokens_to_string([token]).strip()
            if len(text) >= 3 and text.isalpha() and not token.startswith("##") and i < weight.shape[0]:
                words.setdefault(text.lower(), i)
        self.ids = torch.tensor(list(words.values()), dtype=torch.long)
        self.texts = list(words)
        self.table = torch.nn.functional.normalize(weight[self.ids], dim=1) if len(self.ids) else None
        self.weight = weight
        self.cache: dict[str, list[str]] = {}

    def __call__(self, word: str) -> list[str]:
        key = word.lower()
        if key not in self.cache:
            self.cache[key] = self._find(key)
        return self.cache[key]

    def _find(self, word: str) -> list[str]:
        ids = self.tok(word, add_special_tokens=False)["input_ids"]
        if self.table is None or len(ids) != 1 or not word.isalpha():
            return []  # only whole words the tokenizer knows as one token
        query = torch.nn.functional.normalize(self.weight[ids[0]], dim=0)
        best = (self.table @ query).topk(min(NEIGHBOURS + 1, len(self.texts))).indices.tolist()
        return [self.texts[i] for i in best if self.texts[i] != word][:NEIGHBOURS]


def _changes(n_words: int, rate: float) -> int:
    return max(1, round(rate * n_words))


def alter(text: str, op: str, rate: float, rng: random.Random, synonyms: EmbeddingNeighbours | None) -> str:
    words = text.split()
    if len(words) < 2 and op != "synonym":
        return text
    n = _changes(len(words), rate)
    if op == "delete":
        drop = set(rng.sample(range(len(words)), min(n, len(words) - 1)))
        words = [w for i, w in enumerate(words) if i not in drop]
    elif op == "swap":
        for _ in range(n):
            i, j = rng.sample(range(len(words)), 2)
            words[i], words[j] = words[j], words[i]
    elif op == "insert":
        for _ in range(n):
            words.insert(rng.randrange(len(words) + 1), rng.choice(words))
    elif op == "synonym" and synonyms is not None:
        candidates = [i for i, w in enumerate(words) if synonyms(w)]
        for i in rng.sample(candidates, min(n, len(candidates))):
            words[i] = rng.choice(synonyms(words[i]))
    return " ".join(words)


def expand(rows: list[dict], data_cfg, seed: int, model=None, tokenizer=None) -> tuple[list[dict], dict]:
    """The training rows followed by their augmented copies; and the counts for the data report."""
    rng = random.Random(seed)
    synonyms = EmbeddingNeighbours(model, tokenizer) if "synonym" in data_cfg.augment_ops and model is not None else None
    out, per_op, unchanged = list(rows), dict.fromkeys(data_cfg.augment_ops, 0), 0
    for r in rows:
        for _ in range(data_cfg.augment_copies):
            op = rng.choice(data_cfg.augment_ops)
            text = alter(r["text"], op, data_cfg.augment_rate, rng, synonyms)
            if text == r["text"]:
                unchanged += 1
                continue
            out.append({**r, "text": text, "augmented": op})
            per_op[op] += 1
    return out, {"added": len(out) - len(rows), "by_op": per_op, "unchanged_skipped": unchanged}
