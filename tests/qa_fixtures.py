"""Seeded SQuAD-style data: short biographies with questions whose answers are spans, some unanswerable.

Each paragraph is about one person (born in a city in a year, studied a subject at a university, worked for an
organisation as something), its sentences in varied wordings and order, sometimes with a sibling's birthplace as
a distractor and a filler sentence. Questions ask for those facts; unanswerable ones (SQuAD v2) ask for a fact
the paragraph leaves out, or for one it never gives (when the person died). Answer offsets are recorded while
the text is built, never searched for.

    python tests/qa_fixtures.py examples/qa     # writes the shipped train-v2.0.json and test-v2.0.json
"""

from __future__ import annotations

import json
import random
import string
import sys
from pathlib import Path

WOMEN = ["Anna", "Maria", "Clara", "Ingrid", "Sofia", "Helen", "Nadia", "Irene", "Lucia", "Marta", "Agnes", "Elena",
         "Rosa", "Greta", "Alice", "Vera"]
MEN = ["Peter", "Jonas", "Karl", "Tomas", "Ivan", "Marco", "David", "Henrik", "Pablo", "Victor", "Samuel", "Oskar",
       "Felix", "Hugo", "Anton", "Leon"]
SURNAMES = ["Berg", "Novak", "Keller", "Rossi", "Lindqvist", "Moreau", "Fischer", "Kowalski", "Hart", "Duval",
            "Brandt", "Ferreira", "Holm", "Costa", "Weber", "Janssen", "Olsen", "Marsh", "Varga", "Quinn"]
CITIES = ["Lyon", "Porto", "Krakow", "Leeds", "Bergen", "Turin", "Graz", "Ghent", "Malmo", "Dublin", "Seville",
          "Bremen", "Brno", "Tartu", "Aarhus", "Bologna", "New York", "Buenos Aires", "Cape Town", "San Diego"]
YEARS = [str(y) for y in range(1920, 1990)]
SUBJECTS = ["chemistry", "physics", "law", "medicine", "economics", "history", "architecture", "mathematics",
            "civil engineering", "marine biology", "political science", "computer science"]
UNIVERSITIES = ["the University of Vienna", "the University of Leeds", "Uppsala University", "Charles University",
                "the University of Bologna", "Trinity College", "Ghent University", "the Sorbonne"]
ORGANISATIONS = ["the Red Cross", "the World Bank", "Siemens", "Philips", "the United Nations", "Volvo", "Unilever",
                 "the National Gallery", "the BBC", "Reuters", "Nokia", "the European Space Agency"]
ROLES = ["an engineer", "a translator", "a lawyer", "an economist", "a researcher", "a designer", "a chief editor",
         "a project manager", "an accountant", "a photographer"]
HOBBIES = ["chess", "sailing", "painting", "cycling", "gardening", "the violin", "mountain climbing", "photography"]

BIRTH = ["{name} was born in {city} in {year}.", "{name} was born in {year} in {city}.",
         "Born in {city} in {year}, {name} grew up there.", "{name} was born in the city of {city} in {year}."]
STUDY = ["{pron} studied {subject} at {university}.", "{pron} later read {subject} at {university}.",
         "After school {pron_l} studied {subject} at {university}."]
WORK = ["{pron} worked for {org} as {role}.", "{pron} joined {org} as {role} and stayed for many years.",
        "For most of {poss} career {pron_l} worked as {role} for {org}."]
SIBLING = ["{poss_c} {sibling}, {other}, was born in {city2}.", "{poss_c} {sibling} {other} was born in {city2}."]
FILLER = ["{pron} enjoyed {hobby} and {hobby2}.", "In {poss} free time {pron_l} liked {hobby}.",
          "{pron} had {children} children."]

QUESTIONS = {
    "city": ["Where was {name} born?", "In which city was {name} born?", "What city was {name} born in?"],
    "year": ["When was {name} born?", "In what year was {name} born?", "What year was {name} born in?"],
    "subject": ["What did {name} study?", "Which subject did {name} study?"],
    "university": ["Where did {name} study?", "At which university did {name} study?"],
    "org": ["Which organisation did {name} work for?", "Who did {name} work for?", "Where did {name} work?"],
    "role": ["What did {name} work as?", "What was the job of {name}?"],
    "city2": ["Where was {other} born?", "In which city was {other} born?"],
    # Never answered by any paragraph: SQuAD v2's plausible but unanswerable questions.
    "died": ["When did {name} die?", "In what year did {name} die?"],
}
# (sentence kind, its templates, the facts it states)
SENTENCES = [("birth", BIRTH, ("city", "year")), ("study", STUDY, ("subject", "university")),
             ("work", WORK, ("org", "role"))]


def _fill(template: str, values: dict, offset: int, spans: dict) -> str:
    """Format `template`, recording where each fact lands: spans[field] = (start, text) in the paragraph."""
    out = ""
    for literal, field, _, _ in string.Formatter().parse(template):
        out += literal
        if field is not None:
            if field in ("city", "year", "subject", "university", "org", "role", "city2"):
                spans[field] = (offset + len(out), values[field])
            out += values[field]
    return out


def make_paragraph(rng: random.Random, distractor_rate: float = 0.3, unanswerable_rate: float = 0.25,
                   filler_rate: float = 0.5) -> dict:
    """One biography with its questions: {"title", "context", "qas": [{"id", "question", "answers", "is_impossible"}]}."""
    woman = rng.random() < 0.5
    first = rng.choice(WOMEN if woman else MEN)
    name = f"{first} {rng.choice(SURNAMES)}"
    pron, poss = ("She", "her") if woman else ("He", "his")
    values = {"name": name, "pron": pron, "pron_l": pron.lower(), "poss": poss, "poss_c": poss.capitalize(),
              "city": rng.choice(CITIES), "year": rng.choice(YEARS), "subject": rng.choice(SUBJECTS),
              "university": rng.choice(UNIVERSITIES), "org": rng.choice(ORGANISATIONS), "role": rng.choice(ROLES),
              "hobby": None, "children": rng.choice(["two", "three", "four"])}
    values["hobby"], values["hobby2"] = rng.sample(HOBBIES, 2)
    # The birth sentence names the person and always comes first; one of the other facts may be left out.
    kinds = [SENTENCES[0]] + rng.sample(SENTENCES[1:], 2)
    if rng.random() < unanswerable_rate:
        kinds = kinds[:2]
    if rng.random() < distractor_rate:
        sister = rng.random() < 0.5
        sibling_first = rng.choice([n for n in (WOMEN if sister else MEN) if n != first])  # never the same name
        values.update(sibling="sister" if sister else "brother", other=f"{sibling_first} {name.split()[1]}",
                      city2=rng.choice([c for c in CITIES if c != values["city"]]))
        kinds.insert(rng.randint(1, len(kinds)), ("sibling", SIBLING, ("city2",)))
    if rng.random() < filler_rate:
        kinds.insert(rng.randint(1, len(kinds)), ("filler", FILLER, ()))
    context, spans = "", {}
    for _, templates, _ in kinds:
        sentence = _fill(rng.choice(templates), values, len(context) + (1 if context else 0), spans)
        context += (" " if context else "") + sentence
    # About four questions a paragraph, a quarter of them unanswerable (SQuAD v2 has a third).
    answerable = [f for f in QUESTIONS if f in spans]
    missing = [f for f in QUESTIONS if f not in spans and f != "city2"]
    asked = rng.sample(answerable, min(len(answerable), rng.randint(2, 4)))
    asked += rng.sample(missing, min(len(missing), rng.choices([0, 1, 2], weights=[3, 5, 2])[0]))
    qas = []
    for fact in rng.sample(asked, len(asked)):
        question = rng.choice(QUESTIONS[fact]).format(**values)
        answers = [{"text": spans[fact][1], "answer_start": spans[fact][0]}] if fact in spans else []
        qas.append({"id": f"{rng.getrandbits(96):024x}", "question": question, "answers": answers,
                    "is_impossible": not answers})
    return {"title": name, "context": context, "qas": qas}


def make_paragraphs(n: int, seed: int = 0, **kw) -> list[dict]:
    rng = random.Random(seed)
    return [make_paragraph(rng, **kw) for _ in range(n)]


def squad_json(paragraphs: list[dict]) -> dict:
    """SQuAD v2.0 layout: one article per person."""
    return {"version": "v2.0", "data": [{"title": p["title"], "paragraphs": [{"context": p["context"], "qas": p["qas"]}]}
                                        for p in paragraphs]}


def flat_rows(paragraphs: list[dict], layout: str = "hf") -> list[dict]:
    """One row per question; answers as Hugging Face datasets has them ("hf") or as a list of {text, answer_start}."""
    rows = []
    for p in paragraphs:
        for qa in p["qas"]:
            answers = qa["answers"]
            if layout == "hf":
                answers = {"text": [a["text"] for a in answers], "answer_start": [a["answer_start"] for a in answers]}
            rows.append({"id": qa["id"], "title": p["title"], "question": qa["question"], "context": p["context"],
                         "answers": answers})
    return rows


def vocabulary() -> list[str]:
    """Every lowercased word and punctuation mark the generator can write (for a word-level test tokenizer)."""
    texts = WOMEN + MEN + SURNAMES + CITIES + YEARS + SUBJECTS + UNIVERSITIES + ORGANISATIONS + ROLES + HOBBIES
    texts += BIRTH + STUDY + WORK + SIBLING + FILLER + [q for qs in QUESTIONS.values() for q in qs]
    texts += ["she he her his sister brother two three four"]
    words = set()
    for t in texts:
        t = string.Formatter().parse(t)
        for literal, *_ in t:
            for w in "".join(c if c.isalnum() else f" {c} " for c in literal.lower()).split():
                words.add(w)
    return sorted(words)


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train-v2.0.json", 80, 2024), ("test-v2.0.json", 22, 7)):
        paragraphs = make_paragraphs(n, seed=seed)
        (out / name).write_text(json.dumps(squad_json(paragraphs), indent=1) + "\n", encoding="utf-8")
        questions = [q for p in paragraphs for q in p["qas"]]
        print(f"{out / name}: {len(paragraphs)} paragraphs, {len(questions)} questions, "
              f"{sum(q['is_impossible'] for q in questions)} unanswerable")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "examples/qa")
