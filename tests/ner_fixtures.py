"""Seeded NER fixtures: news-like templated sentences with PER / LOC / ORG names (many multi-word), written as
CoNLL columns or JSONL (tokens + tags, or text + character-offset entities).

    sentences = make_sentences(200, seed=0)          # [(tokens, tags)]
    write_conll(path, sentences); write_jsonl_tokens(path, sentences); write_jsonl_entities(path, sentences)

`python tests/ner_fixtures.py examples/ner` writes the shipped sample files (examples/ner/{train,test}.conll:
200 and 50 distinct sentences, no test sentence in train).
Names of each type come from their own pools; the same surface never has two types (Washington is not both a
person and a place here), so a model that reads context and names well can be scored exactly.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

FIRST = ["John", "Mary", "Ahmed", "Sofia", "Carlos", "Anna", "David", "Fatima", "Peter", "Yuki", "Olga", "Kwame",
         "Elena", "Rahul", "Grace", "Lucas", "Ingrid", "Tomasz", "Amara", "Hiroshi"]
LAST = ["Smith", "Okafor", "Garcia", "Chen", "Novak", "Schmidt", "Rossi", "Kowalski", "Tanaka", "Murphy", "Haddad",
        "Lindqvist", "Mensah", "Dubois", "Ivanova", "Patel", "Moreno", "Fischer", "Nakamura", "O'Brien"]
LOC = ["Paris", "Berlin", "Lagos", "Tokyo", "Madrid", "Nairobi", "Oslo", "Lima", "New York", "San Francisco",
       "Buenos Aires", "Hong Kong", "Cape Town", "Rio de Janeiro", "Kuala Lumpur", "Germany", "Brazil", "Kenya",
       "South Korea", "the Netherlands"]
ORG = ["Acme Corporation", "Globex", "Initech", "Northwind Traders", "the United Nations", "the Red Cross",
       "Reuters", "Siemens", "Toyota", "the World Bank", "Interpol", "Oxfam", "the European Commission",
       "Stark Industries", "Umbrella Health", "Blue Harbor Shipping", "Greenfield University", "the Central Bank",
       "Delta Airlines", "Nordic Energy Group"]
TEMPLATES = [
    "{PER} joined {ORG} in {LOC} last year .",
    "{PER} , a spokesman for {ORG} , said the talks in {LOC} had stalled .",
    "{ORG} opened a new office in {LOC} on Monday .",
    "Police in {LOC} said {PER} was arrested on Friday .",
    "{PER} met {PER} in {LOC} to discuss the merger with {ORG} .",
    "Shares of {ORG} fell 3 percent after {PER} resigned .",
    "{PER} was born in {LOC} and later worked for {ORG} .",
    "{LOC} beat {LOC} 2-1 in the final on Sunday .",
    "According to {PER} , {ORG} will hire 200 people in {LOC} .",
    "{PER} told reporters in {LOC} that {ORG} would appeal the ruling .",
    "It rained in {LOC} for most of the week .",
    "The board of {ORG} named {PER} chief executive .",
    "Flights from {LOC} to {LOC} were cancelled because of the storm .",
    "{ORG} and {ORG} signed a supply deal worth 40 million dollars .",
    "The meeting ended without an agreement .",
    "Prices rose again in March , the report said .",
]


def _person(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.15:
        return rng.choice(FIRST)
    if r < 0.3:
        return f"{rng.choice(FIRST)} {rng.choice(FIRST)} {rng.choice(LAST)}"
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def _name(kind: str, rng: random.Random) -> list[str]:
    return (_person(rng) if kind == "PER" else rng.choice(LOC if kind == "LOC" else ORG)).split()


def make_sentences(n: int, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """n sentences as (tokens, IOB2 tags), seeded."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        tokens, tags, used = [], [], set()
        for part in rng.choice(TEMPLATES).split():
            kind = part[1:-1] if part.startswith("{") else None
            if kind is None:
                tokens.append(part)
                tags.append("O")
                continue
            words = _name(kind, rng)
            while " ".join(words) in used:  # "Interpol and Interpol signed ..." reads as a bug, not as news
                words = _name(kind, rng)
            used.add(" ".join(words))
            if words[0] == "the":  # outside the entity, as in CoNLL-2003: "the [United Nations]"
                tokens.append("the")
                tags.append("O")
                words = words[1:]
            tokens += words
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
        tokens[0] = tokens[0][0].upper() + tokens[0][1:]
        out.append((tokens, tags))
    return out


def make_unique(n: int, seed: int = 0, exclude=()) -> list[tuple[list[str], list[str]]]:
    """n distinct sentences, none of them in `exclude` (sentences of another split), seeded."""
    seen = {tuple(t) for t, _ in exclude}
    out, rng_seed = [], seed
    while len(out) < n:
        for tokens, tags in make_sentences(n, rng_seed):
            if tuple(tokens) not in seen and len(out) < n:
                seen.add(tuple(tokens))
                out.append((tokens, tags))
        rng_seed += 1000
    return out


def vocabulary() -> list[str]:
    """Every word the generator can write."""
    words = {w for t in TEMPLATES for w in t.split() if not w.startswith("{")} | {"The"}
    words |= {w for pool in (FIRST, LAST, LOC, ORG) for name in pool for w in name.split()}
    return sorted(words)


def detokenize(tokens: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Running text (no space before , and .) and each token's character span in it."""
    text, spans = "", []
    for t in tokens:
        if text and t not in (",", "."):
            text += " "
        spans.append((len(text), len(text) + len(t)))
        text += t
    return text, spans


def entities_of(tokens: list[str], tags: list[str]) -> tuple[str, list[dict]]:
    """The sentence as running text and its entities as {"start", "end", "label"} character offsets."""
    text, spans = detokenize(tokens)
    ents = []
    for i, tag in enumerate(tags):
        if tag.startswith("B-"):
            j = i + 1
            while j < len(tags) and tags[j] == "I-" + tag[2:]:
                j += 1
            ents.append({"start": spans[i][0], "end": spans[j - 1][1], "label": tag[2:]})
    return text, ents


def write_conll(path: Path, sentences, docstart: bool = True) -> Path:
    lines = ["-DOCSTART- -X- -X- O", ""] if docstart else []
    for tokens, tags in sentences:
        lines += [f"{w} {t}" for w, t in zip(tokens, tags)] + [""]
    Path(path).write_text("\n".join(lines), encoding="utf-8")
    return Path(path)


def write_jsonl_tokens(path: Path, sentences) -> Path:
    rows = [{"tokens": tokens, "tags": tags} for tokens, tags in sentences]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return Path(path)


def write_jsonl_entities(path: Path, sentences) -> Path:
    rows = []
    for tokens, tags in sentences:
        text, ents = entities_of(tokens, tags)
        rows.append({"text": text, "entities": ents})
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return Path(path)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "examples/ner")
    out.mkdir(parents=True, exist_ok=True)
    train = make_unique(200, seed=2024)
    write_conll(out / "train.conll", train)
    write_conll(out / "test.conll", make_unique(50, seed=2025, exclude=train))
    print(f"wrote {out / 'train.conll'} (200 sentences) and {out / 'test.conll'} (50)")
