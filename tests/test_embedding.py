"""Embeddings (task.type embedding): the contrastive loss against sentence-transformers', duplicate masking, the
gradient cache against the plain large batch, retrieval metrics against scikit-learn, training, every method, the
sentence-transformers export, and the embed / search commands."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FILLER, FORWARD_OPS, NEGATIVE, POSITIVE, make_rows, size, tol, write_jsonl

import tunelab
from tunelab import methods
from tunelab.errors import TunelabError
from tunelab.tasks import embedding as task

WORDS = sorted(set(POSITIVE + NEGATIVE + FILLER))
TRANSLATE = dict(zip(WORDS, random.Random(7).sample(WORDS, len(WORDS))))


def pairs(n: int, seed: int = 0) -> list[dict]:
    """Each anchor's positive is the same words through a fixed permutation of the vocabulary: a base model's
    pooled states cannot match them, a trained one can."""
    return [{"anchor": r["text"], "positive": " ".join(TRANSLATE[w] for w in r["text"].split())}
            for r in make_rows(n, seed)]


def info(**kw) -> dict:
    return {"pooling": "mean", "normalize": True, "scale": 20.0, "symmetric": False, "gradient_cache": 0, **kw}


def vectors_and_keys(rows: int, sides: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(sides * rows, 16, generator=g, dtype=torch.float64)
    keys = torch.arange(sides * rows).view(sides, rows).T.contiguous()
    return vectors, keys


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("sides", [2, 3])
def test_contrastive_loss_equals_sentence_transformers(sides, symmetric):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    if symmetric and sides == 3:
        pytest.skip("sentence-transformers' symmetric loss takes pairs")
    vectors, keys = vectors_and_keys(8, sides)
    ours = task.contrastive(vectors, keys, 20.0, symmetric) / 8
    kw = {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"} if symmetric else {}
    peer = MultipleNegativesRankingLoss(None, scale=20.0, **kw)
    theirs = peer.compute_loss_from_embeddings(list(vectors.float().view(sides, 8, 16)), None)
    # both in float32: scores of up to the scale (20) from 16-term dot products, then log-sum-exps over the columns
    assert abs(float(ours) - float(theirs)) <= tol(20.0, ops=16 + 8 * sides)


def test_duplicate_positives_are_masked_not_taught_as_negatives():
    vectors, keys = vectors_and_keys(6, 2, seed=1)
    keys[4, 1] = keys[1, 1]  # rows 1 and 4 share their positive text
    keys[5, 0] = keys[2, 0]  # rows 2 and 5 share their anchor text
    got = task.contrastive(vectors, keys, 20.0, False)
    a, p = F.normalize(vectors[:6], dim=-1), F.normalize(vectors[6:], dim=-1)
    scores = 20.0 * a @ p.T
    want = 0.0
    for i in range(6):
        right_too = {1: [4], 4: [1], 2: [5], 5: [2]}.get(i, [])
        keep = [j for j in range(6) if j not in right_too]
        want += -(scores[i, i] - torch.logsumexp(scores[i, keep], 0))
    # `got` is float32 (contrastive's own dtype): 6 rows of scores up to 20, 16-term dot products, 6 columns
    assert torch.allclose(got.double(), want, atol=tol(6 * 20.0, ops=16 + 6), rtol=0)
    unmasked = F.cross_entropy(scores, torch.arange(6), reduction="sum")
    assert float(got) < float(unmasked)  # the masked columns were counted as negatives before


def test_symmetric_loss_masks_both_directions():
    vectors, keys = vectors_and_keys(5, 2, seed=2)
    keys[3, 1] = keys[0, 1]
    got = task.contrastive(vectors, keys, 10.0, True)
    a, p = F.normalize(vectors[:5], dim=-1), F.normalize(vectors[5:], dim=-1)
    fwd, back = 10.0 * a @ p.T, 10.0 * p @ a.T
    want = 0.0
    for i in range(5):
        keep = [j for j in range(5) if j == i or {i, j} != {0, 3}]
        want += (-(fwd[i, i] - torch.logsumexp(fwd[i, keep], 0)) - (back[i, i] - torch.logsumexp(back[i, keep], 0))) / 2
    # `got` is float32: 5 rows, both ways, of scores up to 10, 16-term dot products, 5 columns
    assert torch.allclose(got.double(), want, atol=tol(2 * 5 * 10.0, ops=16 + 5), rtol=0)


def _batch(tiny_bert, rows: list[dict], pooling: str = "mean"):
    from tunelab.models import load_tokenizer

    tok = load_tokenizer(tiny_bert)
    feats, _ = task.encode(rows, tok, info(pooling=pooling), 64)
    return task.collate(feats, tok.pad_token_id)


def _model(tiny_bert, dropout: float):
    from transformers import AutoModel

    torch.manual_seed(0)
    return AutoModel.from_pretrained(tiny_bert, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_gradient_cache_gives_the_loss_and_gradient_of_the_whole_batch(tiny_bert, pooling, symmetric):
    rows = [{**r, "negative": p["positive"]} for r, p in zip(pairs(12, seed=3), pairs(12, seed=4))]
    batch = _batch(tiny_bert, rows, pooling)
    results = []
    for chunk in (0, 5):
        model = _model(tiny_bert, 0.0)
        loss = task.loss(model, batch, info(pooling=pooling, symmetric=symmetric, gradient_cache=chunk))
        (0.37 * loss).backward()  # the loop scales the summed loss before backward
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain, grads), (cached, cached_grads) = results
    # The same sums, chunked otherwise. The loss: 12 rows' cross-entropies over scores of up to `scale` (20), from
    # vectors whatever the chunking rounds like one forward pass.
    assert abs(plain - cached) <= tol(12 * 20.0, FORWARD_OPS)
    # The gradients: embed() and contrastive() work in float32 whatever the model's dtype (so float64 would not
    # help), and the cache multiplies the vectors' gradients by the upstream 0.37 after contrastive's backward where
    # the plain batch does it before. Those gradients round at eps x 0.37 x 2 x scale per unit vector (the
    # softmax's |p - onehot| sums to at most 2), over sums of the 36 texts and a vector's 32 dimensions; the model's
    # backward carries that as it carries a unit vector gradient (`reach`). The roundings are independent, so they
    # add like sqrt(n), not n: the worst-case n·eps would exceed the cls pooling's gradients themselves, which are
    # small (the tiny model's first-token states are nearly alike) and mostly cancel to the last digits.
    model = _model(tiny_bert, 0.0)
    vectors = task.embed_sides(model, batch)
    (vectors / vectors.norm(dim=-1, keepdim=True).detach()).sum().backward()
    reach = size([p.grad for p in model.parameters() if p.grad is not None])
    atol = tol(0.37 * 2 * 20.0 * reach, ops=math.sqrt(len(batch["input_ids"]) + vectors.shape[-1]))
    assert grads.keys() == cached_grads.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads[name], cached_grads[name], atol=atol, rtol=0, msg=name)


def test_gradient_cache_replays_dropout(tiny_bert):
    """With dropout on, each chunk's second forward must draw the same masks as its first: the cached gradient
    then equals that of the same chunked forwards kept with their graphs."""
    batch = _batch(tiny_bert, pairs(10, seed=5))
    chunk, options = 6, info(gradient_cache=6)
    model = _model(tiny_bert, 0.3).train()
    torch.manual_seed(123)
    task.loss(model, batch, options).backward()
    cached = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    after_cached = torch.get_rng_state()
    model.zero_grad()
    torch.manual_seed(123)
    pieces = [task.embed(model, batch["input_ids"][i : i + chunk], batch["attention_mask"][i : i + chunk], 0)
              for i in range(0, len(batch["input_ids"]), chunk)]
    task.contrastive(torch.cat(pieces), batch["keys"], 20.0, False).backward()
    assert torch.equal(after_cached, torch.get_rng_state())  # the run's random stream goes on as without the replay
    assert len(cached) > 10
    # The same per-chunk gradients, summed over the 4 chunks in another order: n·eps on sums of 4 terms each up to
    # the size of the gradients
    chunks = len(pieces)
    atol = tol(chunks * size(list(cached.values())), ops=chunks)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, cached[name], atol=atol, rtol=0, msg=name)


def test_retrieval_metrics_match_scikit_learn_and_hand_counts():
    from sklearn.metrics import ndcg_score

    g = torch.Generator().manual_seed(0)
    queries, corpus = torch.randn(30, 8, generator=g), torch.randn(50, 8, generator=g)
    relevant = [set(random.Random(q).sample(range(50), 1 + q % 3)) for q in range(30)]
    got = task.retrieval(queries, corpus, relevant, 20.0)
    sims = (F.normalize(queries, dim=-1) @ F.normalize(corpus, dim=-1).T).numpy()
    truth = np.zeros((30, 50))
    for q, rel in enumerate(relevant):
        truth[q, list(rel)] = 1
    # float64 arithmetic on the same ranking: means over 30 queries of up to 10 gains (or 1 / rank)
    atol = tol(1.0, 30 + 10, torch.float64)
    assert got["ndcg@10"] == pytest.approx(ndcg_score(truth, sims, k=10), abs=atol)
    order = np.argsort(-sims, axis=1)
    for k in (1, 5, 10):
        want = np.mean([len(set(order[q, :k]) & relevant[q]) / len(relevant[q]) for q in range(30)])
        assert got[f"recall@{k}"] == pytest.approx(want, abs=atol)
    ranks = [next((r + 1 for r in range(10) if order[q, r] in relevant[q]), None) for q in range(30)]
    assert got["mrr@10"] == pytest.approx(np.mean([1 / r if r else 0 for r in ranks]), abs=atol)


def test_split_metrics_search_distinct_anchors_among_distinct_documents():
    """Two rows with the same anchor and two answers: one query with two relevant documents; a repeated answer
    is one document."""
    out = torch.eye(4)[[0, 1, 0, 2, 1, 1]].view(3, 2, 4).float()  # vectors: (e0, e1), (e0, e2), (e1, e1)
    labels = torch.tensor([[10, 11], [10, 12], [13, 11]])  # text ids: anchors 10, 10, 13; answers 11, 12, 11
    m = task.metrics(out, labels, info())
    assert (m["queries"], m["corpus"]) == (2, 2)
    assert m["recall@1"] == 0.75  # query 10 finds one of its two answers first, query 13 its one
    assert m["mrr@10"] == 1.0 and m["recall@5"] == 1.0


def test_thirty_steps_lower_the_loss_and_beat_the_base(tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", pairs(240, seed=1))
    run = tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={train}", "task.type=embedding",
                               "method.name=full", "train.max_steps=30", "train.batch_size=16", "train.lr=3e-3",
                               "train.eval_every=30", "eval.forgetting=none", "data.val_fraction=0.25",
                               f"output_dir={tmp_path / 'run'}"])
    base, tuned = run.summary["base"]["validation"], run.summary["eval"]
    assert tuned["loss"] < base["loss"]
    assert tuned["mrr@10"] > base["mrr@10"]
    assert json.loads((run.dir / "labels.json").read_text())["pooling"] == "mean"
    assert run.summary["artifact"] == "model"


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_every_method_runs_a_step_and_embeds(method, tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{**r, "neg": n["positive"]}
                                                   for r, n in zip(pairs(40, 1), pairs(40, 2))])
    extra = {"freeze": ["method.freeze_layers=1"], "lora": ["method.r=4"], "dora": ["method.r=4"],
             "qlora": ["method.r=4"]}.get(method, [])
    run = tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={train}", "task.type=embedding",
                               "data.negative_field=neg", f"method.name={method}", *extra, "train.max_steps=1",
                               "train.batch_size=8", "eval.samples=2", "eval.forgetting=none",
                               f"output_dir={tmp_path / 'run'}"])
    assert run.summary["steps"] == 1
    assert {"recall@1", "mrr@10", "ndcg@10"} <= run.summary["eval"].keys()
    vectors = tunelab.load(run.dir).embed(["the film was great", "awful"])
    assert vectors.shape == (2, 32)
    # float32 unit vectors: normalised over 32 squares, and their norm taken again here
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=tol(1.0, 2 * 32 + 2), rtol=0)


@pytest.fixture(scope="module")
def lora_run(tiny_bert, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embedding")
    train = write_jsonl(tmp / "train.jsonl", pairs(80, seed=1))
    return tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={train}", "task.type=embedding",
                                "method.name=lora", "method.r=4", "train.max_steps=4", "train.batch_size=8",
                                "train.lr=1e-2", "eval.forgetting=none", "data.max_length=48",
                                f"output_dir={tmp / 'run'}"])


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_sentence_transformers_export_loads_and_matches(lora_run, pooling, tmp_path):
    from sentence_transformers import SentenceTransformer

    from tunelab import export

    texts = ["the film was great and fun", "awful boring plot", "a really moving story about the cast", "dull"]
    model = tunelab.load(lora_run.dir)
    model.info["pooling"] = pooling  # the same weights, pooled another way: the export must follow
    ours = model.embed(texts)
    out = export.sentence_transformers(model, tmp_path / "st")
    st = SentenceTransformer(str(out), device="cpu")
    theirs = st.encode(texts, convert_to_numpy=True, batch_size=2)
    assert st.max_seq_length == 48
    assert np.abs(ours - theirs).max() <= tol(1.0, FORWARD_OPS)  # unit vectors from another library's forward pass


def test_export_command_writes_a_sentence_transformers_dir(lora_run, tmp_path, cli_run):
    res = cli_run("export", lora_run.dir, tmp_path / "st", "--format", "sentence-transformers")
    assert res.code == 0, res.err
    modules = json.loads((tmp_path / "st" / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    assert not (tmp_path / "st" / "adapter_config.json").exists()  # merged: a plain model at the top level


def test_embed_and_search_commands(lora_run, tmp_path, cli_run):
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in
                                                 ["a great fun film", "boring awful plot", "the cast was moving"]])
    res = cli_run("embed", lora_run.dir, "--input", docs, "--output", tmp_path / "v.npy")
    assert res.code == 0, res.err
    vectors = np.load(tmp_path / "v.npy")
    assert vectors.shape == (3, 32)
    # the command calls the same embed() on the same texts: the same kernels in the same order
    assert np.array_equal(vectors, tunelab.load(lora_run.dir).embed(["a great fun film", "boring awful plot",
                                                                     "the cast was moving"]))
    again = cli_run("embed", lora_run.dir, "--input", docs, "--output", tmp_path / "v.npy")
    assert again.code != 0 and "--overwrite" in again.err and np.array_equal(np.load(tmp_path / "v.npy"), vectors)
    res = cli_run("search", lora_run.dir, "--corpus", docs, "--query", "great film", "--top-k", "2")
    assert res.code == 0, res.err
    lines = res.out.splitlines()
    assert lines[0] == "query: great film" and len(lines) == 3 and lines[1].lstrip().startswith("1 ")
    best = tunelab.load(lora_run.dir).search("great film", ["a great fun film", "boring awful plot",
                                                            "the cast was moving"], 1)[0][0]
    assert best["text"] in lines[1]


def test_predict_on_an_embedding_run_points_to_embed(lora_run):
    with pytest.raises(TunelabError, match="embed or search"):
        tunelab.load(lora_run.dir).predict(["great"])


@pytest.mark.parametrize("row, message", [
    ({"anchor": "  ", "positive": "x"}, r"row 2: 'anchor' \(anchor\) is empty"),
    ({"anchor": "q", "positive": None}, r"row 2: 'positive' \(positive\) is missing"),
    ({"anchor": "q", "positive": 3}, r"row 2: 'positive' \(positive\) is int, not a text"),
])
def test_bad_rows_are_named(row, message, tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"anchor": "a", "positive": "b"}, row, {"anchor": "c", "positive": "d"}])
    with pytest.raises(TunelabError, match=message):
        tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={train}", "task.type=embedding",
                             f"output_dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run").exists()


def test_missing_columns_are_listed(tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"question": "a", "answer": "b"}] * 3)
    with pytest.raises(TunelabError, match=r"no column for the anchor \('anchor', data.anchor_field\), positive.*"
                                           r"columns found: question, answer"):
        tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={train}", "task.type=embedding",
                             f"output_dir={tmp_path / 'run'}"])


def test_evaluate_a_file_of_pairs(lora_run, tmp_path, cli_run):
    test = write_jsonl(tmp_path / "test.jsonl", pairs(30, seed=9))
    got = tunelab.load(lora_run.dir).evaluate(test)
    assert {"recall@1", "mrr@10", "ndcg@10"} <= got.keys() and got["queries"] == 30 - got["dropped"]["duplicate"]
    res = cli_run("eval", lora_run.dir, test)
    assert res.code == 0, res.err
    assert "mrr@10" in res.out
