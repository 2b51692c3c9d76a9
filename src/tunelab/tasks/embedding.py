"""Sentence embeddings for search and recommendation: a bi-encoder trained with in-batch negatives.

- Rows are (anchor, positive[, negative]) texts: a query and the text that answers it (and optionally a hard
  negative that does not). A text's vector is its pooled token states (task.pooling: mean, the first token, or the
  last real token), L2-normalised with task.normalize.
- Loss (InfoNCE / multiple-negatives ranking, as sentence-transformers'): each anchor picks its positive among
  every positive and negative of the batch, on cosine similarities times task.scale; with task.symmetric each
  positive also picks its anchor among the batch's anchors, and the two are averaged. A column that is a right
  answer too (the same text as the row's positive, or the positive of a row with the same anchor) is masked, so
  it is not taught as a negative. Summed
  over rows; the loop divides by the rows of the whole step. Rows interact, so the loop keeps a batch whole.
- task.gradient_cache=N (GradCache, Gao et al. 2021): the batch is embedded N texts at a time without keeping
  activations, the loss's gradient with respect to the vectors is taken, and each chunk is embedded again with
  a graph when the loop calls backward, its vectors' cached gradient pushed through it. Same loss and gradient as
  the whole batch at once, in the memory of N texts. Dropout is replayed by restoring each chunk's RNG state.
- Metrics on validation / test: the split is a search problem: queries are its distinct anchors, the corpus its
  distinct positives and negatives, and an anchor's relevant documents are the positives it has in the split.
  recall@1/5/10, MRR@10, nDCG@10 by exact cosine search, and the contrastive loss over the whole corpus.
- A batch stacks every side's token rows (anchors, then positives, then negatives) in one padded tensor, so the
  loop's token count covers every side; each side is embedded on its own, cut to its own longest text.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from .. import models
from ..data import chat
from ..data.clean import cut_long_texts, cut_report, is_empty_text, kept_chars
from ..data.sources import describe, field_names, read_records
from ..errors import TunelabError
from ..ops import processes
from .base import (  # noqa: F401  (the interface's defaults)
    finish,
    generate,
    generate_replies,
    generation_prompt,
    generation_rows,
    pack,
    packing_fault,
    predict_summary,
    prepare,
    read_generation,
    read_predict,
)

MAIN_METRIC = "mrr@10"
METRICS = ("mrr@10", "ndcg@10", "recall@1", "recall@5", "recall@10", "loss")
HEADLINE = ("recall@1", "mrr@10")
PROBE = False  # the base model's own embeddings are the baseline
BASE = True  # the untrained model's metrics are a baseline
PACKS = False  # no pack(): rows are never packed
FORGETTING = "linear_probe"  # eval.forgetting: a labelled file's linear-probe accuracy before and after
ROWS_INTERACT = True  # in-batch negatives: a batch cut into smaller ones would change the loss
GENERATES = False  # turns texts into vectors: embed, not generate
EMBEDS = True  # embed_texts and search: TunedModel.embed / search, `tunelab embed` / `tunelab search`
SCORES_REPLIES = False  # scores no replies: not a judge or GRPO reward
PIPELINE_TAG = "sentence-similarity"  # sentence vectors compared by cosine
POOLINGS = ("mean", "cls", "last")
KS = (1, 5, 10)


# -- data -------------------------------------------------------------------------

def load_splits(cfg, seed: int):
    return chat.load_splits(cfg, seed, read_file=read)


def read(path: str, key: str, data_cfg, task_type: str = "embedding") -> tuple[list[dict], dict]:
    """(rows, report entry) of one file: {"anchor", "positive"[, "negative"], "row"}; a row with a missing, empty
    or non-text field is an error naming it."""
    fields = {"anchor": data_cfg.anchor_field, "positive": data_cfg.positive_field}
    if data_cfg.negative_field:
        fields["negative"] = data_cfg.negative_field
    origin: dict = {}
    records = read_records(path, key, data_cfg, origin)
    what = describe(path, key, data_cfg)
    if not records:
        raise TunelabError(f"{what} has no rows.")
    first = records[0]["record"]
    absent = [f"{name} ('{col}', data.{name}_field)" for name, col in fields.items() if col not in first]
    if absent:
        raise TunelabError(f"{what} has no column for the {', '.join(absent)}; columns found: {field_names(first)}. "
                           f"Name the columns with data.anchor_field / data.positive_field"
                           f"{' / data.negative_field' if data_cfg.negative_field else ''}, or rename them in the file.")
    rows, problems = [], []
    for r in records:
        row, problem = {"row": r["row"]}, None
        for name, col in fields.items():
            value = r["record"].get(col)
            if not isinstance(value, str):
                problem = f"'{col}' ({name}) is {'missing' if value is None else type(value).__name__}, not a text"
            elif is_empty_text(value):
                problem = f"'{col}' ({name}) is empty"
            row[name] = value
        if problem:
            problems.append((r["row"], problem))
        else:
            rows.append(row)
    if problems:
        row, msg = problems[0]
        more = (f" ({len(problems)} rows have problems: {', '.join(str(p[0]) for p in problems[:10])}"
                f"{', ...' if len(problems) > 10 else ''})") if len(problems) > 1 else ""
        raise TunelabError(f"{what} row {row}: {msg}{more}. Every embedding row needs a non-empty anchor and positive "
                           f"text (e.g. {{\"{fields['anchor']}\": \"How do I reset my password?\", "
                           f"\"{fields['positive']}\": \"Open Settings, then Reset password.\"}}); fix or remove the row.")
    keep = kept_chars(data_cfg.max_length)
    rows_cut = cut_long_texts(rows, tuple(fields), keep)
    kept, seen = [], set()
    for row in rows:
        key_ = tuple(row[k] for k in fields)
        if not data_cfg.dedupe or key_ not in seen:
            seen.add(key_)
            kept.append(row)
    return kept, {"format": "embedding", "rows_read": len(records), "dropped": {"duplicate": len(rows) - len(kept)},
                  "rows": len(kept), **cut_report(rows_cut, keep), **({"dataset": origin} if origin else {})}


def label_info(splits: dict, cfg) -> dict:
    """How texts become vectors and how the loss reads them; saved as the run's labels.json."""
    if cfg.task.gradient_cache:
        if processes.world() > 1:
            raise TunelabError("task.gradient_cache replays each chunk's forward pass during backward, outside the "
                               "distributed wrapper's forward; it runs in one process. Set task.gradient_cache=0, or "
                               "train in one process.")
    return {"pooling": cfg.task.pooling, "normalize": cfg.task.normalize, "scale": cfg.task.scale,
            "symmetric": cfg.task.symmetric, "gradient_cache": cfg.task.gradient_cache}


def key(text: str) -> int:
    """A stable 63-bit id of a text: equal texts are the same document (duplicate masking, the search corpus)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


# -- model ------------------------------------------------------------------------

def build_model(model_cfg, info: dict, path=None):
    from transformers import AutoModel

    return models.load(model_cfg, AutoModel, path=path)


def head_modules(model) -> list[str]:
    return []  # no head: the vectors are the body's own states, pooled


def encode(rows: list[dict], tokenizer, info: dict, max_length: int) -> tuple[list[dict], dict]:
    """Token ids of every side of a row, the ids (`key`) of its texts, and the report's counts."""
    sides = ("anchor", "positive", "negative") if rows and "negative" in rows[0] else ("anchor", "positive")
    feats, cut, tokens = [], 0, 0
    if not rows:
        return [], {"examples": 0, "truncated": 0, "tokens": 0}
    encoded = {s: tokenizer([r[s] for r in rows], truncation=True, max_length=max_length)["input_ids"] for s in sides}
    full = {s: tokenizer([r[s] for r in rows])["input_ids"] for s in sides}
    pool = POOLINGS.index(info["pooling"])
    for i, r in enumerate(rows):
        ids = [encoded[s][i] for s in sides]
        cut += any(len(full[s][i]) > max_length for s in sides)
        tokens += sum(map(len, ids))
        feats.append({"sides": ids, "keys": [key(r[s]) for s in sides], "pool": pool,
                      "length": max(map(len, ids)), "row": r.get("row")})
    return feats, {"examples": len(feats), "truncated": cut, "tokens": tokens}


def texts_features(texts: list[str], tokenizer, info: dict, max_length: int) -> list[dict]:
    """Single texts to embed (`tunelab embed`, search): one side each."""
    pool = POOLINGS.index(info["pooling"])
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return [{"sides": [x], "keys": [key(t)], "pool": pool, "length": len(x)} for x, t in zip(ids, texts)]


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Every side's rows stacked (side-major: all anchors, then all positives, ...) and padded to the longest."""
    n_sides = len(features[0]["sides"])
    seqs = [f["sides"][s] for s in range(n_sides) for f in features]
    longest = max(map(len, seqs))
    input_ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, ids in enumerate(seqs):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "keys": torch.tensor([f["keys"] for f in features]),
            "pool": torch.tensor(features[0]["pool"])}


def pooled(states: torch.Tensor, mask: torch.Tensor, pool: int) -> torch.Tensor:
    """One vector per row from token states (rows, length, hidden): mean of the real tokens, the first token, or
    the last real one (rows are right-padded)."""
    if POOLINGS[pool] == "mean":
        m = mask.unsqueeze(-1).to(states.dtype)
        return (states * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if POOLINGS[pool] == "cls":
        return states[:, 0]
    return states[torch.arange(len(states), device=states.device), mask.sum(1) - 1]


def embed(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool: int) -> torch.Tensor:
    """Pooled vectors (not normalised) of token rows, in float32; columns past the rows' longest are not computed."""
    longest = int(attention_mask.sum(1).max())
    input_ids, attention_mask = input_ids[:, :longest], attention_mask[:, :longest]
    states = model(input_ids=input_ids, attention_mask=attention_mask)[0]
    return pooled(states.float(), attention_mask, pool)


def embed_sides(model, batch) -> torch.Tensor:
    """The vectors of every row of a batch, one side at a time: a batch's questions are not padded to the length of
    its answers."""
    rows, pool = len(batch["keys"]), int(batch["pool"])
    return torch.cat([embed(model, batch["input_ids"][i : i + rows], batch["attention_mask"][i : i + rows], pool)
                      for i in range(0, len(batch["input_ids"]), rows)])


def forward(model, batch) -> torch.Tensor:
    """(rows, sides, hidden): the vectors of each row's anchor, positive (and negative)."""
    vectors = embed_sides(model, batch)
    return vectors.view(-1, len(batch["keys"]), vectors.shape[-1]).transpose(0, 1)


# -- loss -------------------------------------------------------------------------

def contrastive(vectors: torch.Tensor, keys: torch.Tensor, scale: float, symmetric: bool) -> torch.Tensor:
    """Multiple-negatives ranking loss, summed over rows. `vectors`: (sides * rows, hidden), side-major as
    `collate` stacks them; `keys`: (rows, sides), the ids of each row's texts (keys[:, 0] the anchors')."""
    rows = len(keys)
    vectors = F.normalize(vectors.float(), dim=-1)
    anchors, docs = vectors[:rows], vectors[rows:]
    doc_keys = keys[:, 1:].T.reshape(-1)  # side-major, as docs
    target = torch.arange(rows, device=vectors.device)
    # Columns that are right answers too: another copy of this row's positive text, or the positive of another
    # row with the same anchor text. Masked rather than taught as negatives.
    same_anchor = keys[:, :1] == keys[:, 0]
    duplicate = doc_keys[None, :] == keys[:, 1:2]
    duplicate[:, :rows] |= same_anchor
    duplicate[target, target] = False
    scores = (scale * anchors @ docs.T).masked_fill(duplicate, float("-inf"))
    loss = F.cross_entropy(scores, target, reduction="sum")
    if not symmetric:
        return loss
    # the other way, each positive picks its anchor: anchors with the same text or the same answer are right too
    same = (keys[:, 1:2] == keys[:, 1]) | same_anchor
    same[target, target] = False
    back = (scale * docs[:rows] @ anchors.T).masked_fill(same, float("-inf"))
    return (loss + F.cross_entropy(back, target, reduction="sum")) / 2


def loss(model, batch, info: dict) -> torch.Tensor:
    chunk = info.get("gradient_cache") or 0
    if chunk and torch.is_grad_enabled() and chunk < len(batch["input_ids"]):
        return cached_loss(model, batch, info, chunk)
    return contrastive(embed_sides(model, batch), batch["keys"], info["scale"], info["symmetric"])


def _rng_state(device: torch.device):
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def cached_loss(model, batch, info: dict, chunk: int) -> torch.Tensor:
    """GradCache: the loss of the whole batch, with each chunk of `chunk` texts embedded without a graph; the
    returned loss's backward re-embeds chunk by chunk (same RNG, same autocast) and pushes the cached gradients."""
    ids, mask, pool = batch["input_ids"], batch["attention_mask"], int(batch["pool"])
    device = ids.device
    pieces = [(ids[i : i + chunk], mask[i : i + chunk]) for i in range(0, len(ids), chunk)]
    states, vectors = [], []
    with torch.no_grad():
        for piece in pieces:
            states.append(_rng_state(device))
            vectors.append(embed(model, *piece, pool))
    after = _rng_state(device)
    leaves = [v.detach().requires_grad_() for v in vectors]
    with torch.enable_grad():
        summed = contrastive(torch.cat(leaves), batch["keys"], info["scale"], info["symmetric"])
        grads = torch.autograd.grad(summed, leaves)
    cast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))

    def replay(grad_output: torch.Tensor) -> None:
        with torch.enable_grad(), torch.autocast(device.type, dtype=cast[1], enabled=cast[0]):
            for piece, state, grad in zip(pieces, states, grads):
                _set_rng_state(state, device)
                (embed(model, *piece, pool) * (grad * grad_output)).sum().backward()
        _set_rng_state(after, device)

    out = summed.detach().requires_grad_()
    out.register_hook(replay)
    return out


def count(batch) -> int:
    return int(len(batch["keys"]))


def targets(batch) -> torch.Tensor:
    return batch["keys"]


# -- metrics ----------------------------------------------------------------------

def search(queries: torch.Tensor, corpus: torch.Tensor, k: int, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices) of the k nearest corpus vectors to each query by cosine similarity, exact."""
    corpus = F.normalize(corpus.float(), dim=-1)
    out = [torch.topk(F.normalize(q.float(), dim=-1) @ corpus.T, min(k, len(corpus)), dim=-1)
           for q in queries.split(block)]
    return torch.cat([o.values for o in out]), torch.cat([o.indices for o in out])


def retrieval(queries: torch.Tensor, corpus: torch.Tensor, relevant: list[set[int]], scale: float) -> dict:
    """recall@k, MRR@10, nDCG@10 (binary relevance) and the contrastive loss of each query against the whole
    corpus, averaged over queries. `relevant[q]`: the corpus positions relevant to query q."""
    _, top = search(queries, corpus, max(KS))
    hits = torch.tensor([[int(d) in rel for d in row] for row, rel in zip(top.tolist(), relevant)],
                        dtype=torch.float64).reshape(len(relevant), -1)
    n_rel = torch.tensor([len(r) for r in relevant], dtype=torch.float64)
    out = {f"recall@{k}": float((hits[:, :k].sum(1) / n_rel).mean()) for k in KS}
    first = torch.where(hits[:, :10].any(1), hits[:, :10].argmax(1).double() + 1, torch.inf)
    out["mrr@10"] = float((1 / first).mean())
    discount = 1 / torch.log2(torch.arange(2, 12, dtype=torch.float64))[: hits.shape[1]]
    ideal = torch.stack([discount[: int(min(n, 10))].sum() for n in n_rel])
    out["ndcg@10"] = float(((hits[:, :10] * discount[: hits[:, :10].shape[1]]).sum(1) / ideal).mean())
    # the loss: each relevant document against the rest of the corpus, others relevant to the query masked
    q, c = F.normalize(queries.float(), dim=-1), F.normalize(corpus.float(), dim=-1)
    total, n = 0.0, 0
    for start in range(0, len(q), 1024):
        scores = scale * q[start : start + 1024] @ c.T
        for row, rel in zip(scores, relevant[start : start + 1024]):
            idx = torch.tensor(sorted(rel))
            others = row.clone()
            others[idx] = float("-inf")
            total += float((torch.logaddexp(row[idx], torch.logsumexp(others, 0)) - row[idx]).sum())
            n += len(idx)
    out["loss"] = total / max(n, 1)
    return out


def metrics(outputs: torch.Tensor, labels: torch.Tensor, info: dict, features: list[dict] | None = None) -> dict:
    """The split as a search problem: its distinct anchors search its distinct positives and negatives."""
    anchor_keys, doc_keys = labels[:, 0].tolist(), labels[:, 1:].reshape(-1).tolist()
    doc_vectors = outputs[:, 1:].reshape(-1, outputs.shape[-1])
    queries, corpus = {}, {}
    for i, k in enumerate(anchor_keys):
        queries.setdefault(k, i)
    for i, k in enumerate(doc_keys):
        corpus.setdefault(k, i)
    position = {k: p for p, k in enumerate(corpus)}
    relevant = {k: set() for k in queries}
    for a, p in zip(anchor_keys, labels[:, 1].tolist()):
        relevant[a].add(position[p])
    out = retrieval(outputs[list(queries.values()), 0], doc_vectors[list(corpus.values())],
                    [relevant[k] for k in queries], info["scale"])
    return {"mrr@10": out.pop("mrr@10"), "ndcg@10": out.pop("ndcg@10"), **out, "queries": len(queries),
            "corpus": len(corpus)}


def vectors(outputs: torch.Tensor, info: dict) -> torch.Tensor:
    """The vectors a user gets (embed, export): normalised when task.normalize."""
    out = outputs[:, 0].float()
    return F.normalize(out, dim=-1) if info["normalize"] else out


def samples(model, tokenizer, rows: list[dict], info: dict, device, max_length: int, max_new_tokens: int,
            outputs) -> list[dict]:
    """For the first validation rows: the positive each anchor finds nearest among those rows' positives."""
    if not rows:
        return []
    feats, _ = encode(rows, tokenizer, info, max_length)
    out, _ = outputs(feats)
    scores, top = search(out[:, 0], out[:, 1], 1)
    return [{"row": r.get("row"), "anchor": r["anchor"], "gold": r["positive"], "predicted": rows[int(t)]["positive"],
             "score": float(s)} for r, s, t in zip(rows, scores[:, 0], top[:, 0])]


# -- a finished run: embed, search, evaluate ----------------------------------------------------------------------

def embed_texts(texts: list[str], tokenizer, info: dict, max_length: int, outputs) -> torch.Tensor:
    """(texts, dim) vectors of texts, one side each (`texts_features`); normalised when task.normalize."""
    out, _ = outputs(texts_features(texts, tokenizer, info, max_length))
    return vectors(out, info)


def predict(items, pairs, tokenizer, info: dict, cfg, max_length: int, outputs, run_dir) -> list[dict]:
    """An embedding run labels nothing: embed and search are its inference."""
    raise TunelabError(f"'{run_dir}' is an embedding run, which turns texts into vectors: use embed or search "
                       f"(`tunelab embed {run_dir} --input texts.jsonl --output vectors.npy`, `tunelab search "
                       f"{run_dir} --corpus docs.jsonl --query ...`), not predict.")


def eval_features(path, cfg, info: dict, text_field: str | None, label_field: str | None, tokenizer,
                  max_length: int) -> tuple[list[dict], dict]:
    """(anchor, positive) rows, as training reads them: scored as a search over the file's own texts."""
    rows, entry = read(str(path), "eval file", cfg.data)
    feats, stats = encode(rows, tokenizer, info, max_length)
    return feats, {"dropped": entry["dropped"], "truncated": stats["truncated"]}
