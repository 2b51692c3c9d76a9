"""Masked-LM domain adaptation (task.type mlm): BERT's masking scheme measured over >= 10k tokens, seeded
held-out masks, a short run that learns, every method for a step (saved, reloaded, scored again), the refusals
of models without a mask token or an MLM head, and the chain domain-adapt -> classify."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import FILLER, FORWARD_OPS, NEGATIVE, POSITIVE, SPECIALS, make_rows, size, tol, write_jsonl
from safetensors.torch import load_file

import tunelab
from tunelab import config, evaluate, methods, models, predict
from tunelab.errors import TunelabError
from tunelab.tasks import classification, mlm
from tunelab.training import checkpoint

PIECES = ["##s", "##ly", "##ed", "##ing"]
INFO = {"task": "mlm", "mask_probability": 0.15, "whole_word_mask": False, "new_mlm_head": False, "seed": 42}
METHOD_ARGS = {"freeze": ["method.freeze_layers=1"], "lora": ["method.r=4"], "dora": ["method.r=4"], "qlora": ["method.r=4"],
               "adapter": ["method.reduction_factor=4"], "prompt": ["method.num_virtual_tokens=4"],
               "ptuning": ["method.num_virtual_tokens=4"], "prefix": ["method.num_virtual_tokens=4"]}


@pytest.fixture(scope="module")
def mlm_bert(tmp_path_factory):
    """A 2-layer BERT saved *with* its masked-LM head; the vocabulary has a few subword pieces (films -> film ##s)."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    path = tmp_path_factory.mktemp("models") / "tiny-bert-mlm"
    vocab = SPECIALS + sorted(set(POSITIVE + NEGATIVE + FILLER)) + PIECES + list("abcdefghijklmnopqrstuvwxyz")
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64, pad_token_id=0)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("mlm-data") / "train.jsonl", make_rows(300, seed=0))


def _train(model_path, train, out, *overrides):
    return tunelab.train(None, [f"model.path={model_path}", f"data.train={train}", "task.type=mlm",
                                "eval.forgetting=none", "train.batch_size=16", f"output_dir={out}", *overrides])


# -- the masking function ---------------------------------------------------------------------------------------------

SPECIAL_IDS = torch.tensor([0, 1, 2, 3])  # pad, unk, cls, sep
MASK_ID = 3
CANDIDATES = torch.arange(4, 1000)


def _rows(n_rows=200, length=128, seed=0):
    """Ids of padded rows: [CLS] ... [SEP] [PAD]..., words of 1-3 tokens (word index per position, -1 for specials)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 1000, (n_rows, length), generator=g)
    words = torch.full((n_rows, length), -1)
    for i in range(n_rows):
        end = length - int(torch.randint(0, 20, (1,), generator=g))
        ids[i, 0], ids[i, end - 1], ids[i, end:] = 2, 3, 0
        pos, w = 1, 0
        while pos < end - 1:
            n = min(int(torch.randint(1, 4, (1,), generator=g)), end - 1 - pos)
            words[i, pos : pos + n] = w
            pos, w = pos + n, w + 1
    return ids, torch.isin(ids, SPECIAL_IDS), words


def _mask(ids, special, words, seed=1):
    return mlm.mask_tokens(ids, special, words, 0.15, torch.Generator().manual_seed(seed), mask_id=MASK_ID,
                           candidates=CANDIDATES)


def test_token_masking_rates_and_the_80_10_10_split():
    ids, special, _ = _rows()
    inputs, labels = _mask(ids, special, None)
    chosen = labels != -100
    assert int((~special).sum()) >= 10_000
    assert abs(chosen[~special].float().mean().item() - 0.15) < 0.01
    assert not chosen[special].any() and torch.equal(inputs[special], ids[special])  # no special token ever chosen
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    n = int(chosen.sum())
    masked = (inputs == MASK_ID) & chosen
    kept = (inputs == ids) & chosen
    replaced = chosen & ~masked & ~kept
    for part, share in ((masked, 0.8), (replaced, 0.1), (kept, 0.1)):
        assert abs(int(part.sum()) / n - share) < 0.025, (int(part.sum()), n, share)
    assert not torch.isin(inputs[replaced], SPECIAL_IDS).any()  # random replacements are never special tokens


def test_whole_word_masking_takes_every_subword_of_a_chosen_word():
    ids, special, words = _rows()
    inputs, labels = _mask(ids, special, words)
    chosen = labels != -100
    assert not chosen[special].any()
    picked, total = 0, 0
    for row_chosen, row_words in zip(chosen, words):
        for w in range(int(row_words.max()) + 1):
            at = row_chosen[row_words == w]
            assert at.all() or not at.any(), "a word is masked in part"
            picked, total = picked + int(at.all()), total + 1
    assert total >= 10_000 and abs(picked / total - 0.15) < 0.01


def test_the_same_generator_seed_gives_the_same_masks():
    ids, special, words = _rows(20)
    for w in (None, words):
        a, b, c = _mask(ids, special, w, seed=5), _mask(ids, special, w, seed=5), _mask(ids, special, w, seed=6)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])


# -- encoding ---------------------------------------------------------------------------------------------------------

def _tok(path):
    return models.load_tokenizer(path)


def test_held_out_rows_are_masked_once_from_the_seed_and_training_rows_at_every_batch(mlm_bert):
    tok = _tok(mlm_bert)
    rows = [{"text": r["text"], "row": i} for i, r in enumerate(make_rows(200, seed=3), start=1)]
    first, stats = mlm.encode(rows, tok, INFO, 32)
    again, _ = mlm.encode(rows, tok, INFO, 32)
    other, _ = mlm.encode(rows, tok, {**INFO, "seed": 7}, 32)
    assert [f["labels"] for f in first] == [f["labels"] for f in again]
    assert [f["labels"] for f in first] != [f["labels"] for f in other]
    assert stats["masked_tokens"] == sum(x != -100 for f in first for x in f["labels"]) > 0
    # a batch of held-out rows carries its masks; training rows draw new ones from the global RNG each time
    batch = mlm.collate(first[:8], tok.pad_token_id)
    assert torch.equal(batch["labels"], mlm.collate(first[:8], tok.pad_token_id)["labels"])
    train, train_stats = mlm.encode([{**r, "dynamic": True} for r in rows], tok, INFO, 32)
    assert train_stats["masking"] == "dynamic" and "labels" not in train[0]
    torch.manual_seed(0)
    one = mlm.collate(train[:32], tok.pad_token_id)["labels"]
    two = mlm.collate(train[:32], tok.pad_token_id)["labels"]
    torch.manual_seed(0)
    assert not torch.equal(one, two) and torch.equal(one, mlm.collate(train[:32], tok.pad_token_id)["labels"])
    specials = torch.tensor(tok.all_special_ids)
    for f, labels in zip(train[:32], one):
        ids = torch.tensor(f["input_ids"])
        assert (labels[: len(ids)][torch.isin(ids, specials)] == -100).all() and (labels[len(ids):] == -100).all()


def test_long_texts_become_windows_each_with_its_special_tokens(mlm_bert):
    tok = _tok(mlm_bert)
    text = " ".join(["the film was really fun"] * 14)  # 70 words, one token each: 5 windows of 14 + [CLS], [SEP]
    feats, stats = mlm.encode([{"text": text, "row": 1, "dynamic": True}], tok, INFO, 16)
    assert stats["split_into_windows"] == len(feats) - 1 == 4 and stats["texts"] == 1
    for f in feats:
        assert f["input_ids"][0] == tok.cls_token_id and f["input_ids"][-1] == tok.sep_token_id
        assert len(f["input_ids"]) <= 16
    assert sum(len(f["input_ids"]) - 2 for f in feats) == 70


def test_whole_words_come_from_the_tokenizer(mlm_bert):
    tok = _tok(mlm_bert)
    info = {**INFO, "whole_word_mask": True, "mask_probability": 0.5}
    feats, _ = mlm.encode([{"text": "the films really moved", "row": 1, "dynamic": True}], tok, info, 32)
    assert tok.convert_ids_to_tokens(feats[0]["input_ids"]) == ["[CLS]", "the", "film", "##s", "really", "[UNK]", "[SEP]"]
    assert feats[0]["word_ids"] == [-1, 0, 1, 1, 2, 3, -1]
    films = 0
    for seed in range(20):
        torch.manual_seed(seed)
        labels = mlm.collate(feats, tok.pad_token_id)["labels"][0]
        assert bool(labels[2] != -100) == bool(labels[3] != -100) and labels[5] == -100  # [UNK]: special
        films += int(labels[2] != -100)
    assert 0 < films < 20


# -- runs -------------------------------------------------------------------------------------------------------------

def test_a_30_step_run_lowers_the_validation_loss(mlm_bert, texts, tmp_path):
    run = _train(mlm_bert, texts, tmp_path / "run", "method.name=full", "train.max_steps=30", "train.lr=3e-3",
                 "data.val_fraction=0.2", "eval.samples=2")
    base, tuned = run.summary["base"]["validation"], run.summary["eval"]
    assert base["target_tokens"] == tuned["target_tokens"] > 40  # the same masked positions, before and after
    assert tuned["loss"] < base["loss"] - 0.3 and tuned["perplexity"] < base["perplexity"]
    loaded = tunelab.load(run.dir)
    scored = loaded.evaluate(texts)  # an eval file is masked once, from the run's seed: the same figures twice
    assert scored["target_tokens"] > 200 and scored == loaded.evaluate(texts)
    with pytest.raises(TunelabError, match="mlm"):
        loaded.predict(["the film was fun"])


def test_a_resumed_run_draws_the_same_masks(mlm_bert, texts, tmp_path):
    """Training masks come from the global RNG, which checkpoints keep: a run resumed from its step-4 checkpoint
    ends with the weights of the run never stopped (dropout on), bit for bit."""
    whole = _train(mlm_bert, texts, tmp_path / "whole", "method.name=full", "train.max_steps=8", "train.lr=3e-3",
                   "train.checkpoint_every=4", "train.eval_every=100", "train.keep_checkpoints=4",
                   "train.keep_finished_checkpoints=true", "eval.base=false", "eval.samples=0")
    cut = tmp_path / "cut"
    shutil.copytree(whole.dir, cut)
    for path in (cut / checkpoint.DIR).iterdir():
        if path.name != "step-0000004":
            shutil.rmtree(path)
    (cut / "summary.json").unlink()
    shutil.rmtree(cut / "model")
    resumed = tunelab.resume(cut)
    a, b = (load_file(str(d / "model" / "model.safetensors")) for d in (whole.dir, resumed.dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rescored(run):
    """The reloaded run's validation loss, on the validation windows of its own config, and the masked logits of
    its first batch."""
    loaded = tunelab.load(run.dir)
    cfg = loaded.cfg
    splits, _ = mlm.load_splits(cfg, cfg.train.seed)
    feats, _ = mlm.encode(splits["validation"], loaded.tokenizer, loaded.info, cfg.data.max_length)
    loss = evaluate.run(loaded.model, mlm, feats, loaded.info, 16, loaded.tokenizer.pad_token_id, loaded.device)["loss"]
    with torch.no_grad():
        logits = mlm._masked_logits(loaded.model, mlm.collate(feats[:16], loaded.tokenizer.pad_token_id))[0]
    return loss, logits


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_every_method_runs_a_step_and_reloads(name, mlm_bert, tiny_bert, texts, tmp_path):
    """With the checkpoint's own head, and with a new head on a bare encoder (the head modules saved and restored)."""
    for path, extra in ((mlm_bert, []), (tiny_bert, ["task.new_mlm_head=true"])):
        out = tmp_path / f"run-{path.name}"
        run = _train(path, texts, out, f"method.name={name}", *METHOD_ARGS.get(name, []), *extra, "train.max_steps=1",
                     "eval.base=false", "eval.samples=1", "train.lr=1e-2")
        assert run.summary["steps"] == 1 and run.summary["trainable_params"] > 0
        # batched otherwise (16 windows here, eval.batch_size there): a mean of masked-token NLLs, each a forward pass
        # and a log-softmax over the vocabulary, of terms up to 2 max |logit| + log(vocab)
        loss, logits = _rescored(run)
        vocab = logits.shape[-1]
        atol = tol(2 * size(logits) + math.log(vocab), FORWARD_OPS + vocab)
        assert loss == pytest.approx(run.summary["eval"]["loss"], abs=atol)


def test_no_mask_token_or_no_mlm_head_is_a_clear_error(tiny_gpt2, tiny_bert, texts, tmp_path):
    with pytest.raises(TunelabError) as e:
        _train(tiny_gpt2, texts, tmp_path / "gpt2")
    assert str(tiny_gpt2) in str(e.value) and "mask token" in str(e.value) and "task.type=causal_lm" in str(e.value)
    with pytest.raises(TunelabError) as e:
        _train(tiny_bert, texts, tmp_path / "bare")
    assert str(tiny_bert) in str(e.value) and "task.new_mlm_head=true" in str(e.value)
    assert not (tmp_path / "gpt2").exists() and not (tmp_path / "bare").exists()


def test_a_new_head_trains_only_its_own_modules_under_an_adapter(tiny_bert):
    cfg = config.validate({"model": {"path": str(tiny_bert)}, "data": {"train": "x.jsonl"},
                           "task": {"type": "mlm", "new_mlm_head": True}, "method": {"name": "lora", "r": 4}})
    model, _ = mlm.build_model(cfg.model, {**INFO, "new_mlm_head": True})
    head = mlm.head_modules(model)
    assert head == ["cls.predictions.transform"]
    model = methods.prepare(model, cfg.method, head)
    assert not model.get_input_embeddings().weight.requires_grad  # the tied decoder stays frozen
    assert all(p.requires_grad for p in model.cls.predictions.transform.parameters())


@pytest.mark.parametrize("name", ["full", "lora"])
def test_domain_adapt_then_classify(name, tiny_bert, texts, tmp_path):
    """An mlm run directory is the model.path of a classification run: the adapted encoder carries over (LoRA
    merged in), the MLM head is dropped and a classification head starts new."""
    adapted = _train(tiny_bert, texts, tmp_path / "mlm", f"method.name={name}", *METHOD_ARGS.get(name, []),
                     "task.new_mlm_head=true", "train.max_steps=3", "eval.base=false", "eval.samples=0",
                     "train.lr=1e-2")
    mlm_model = tunelab.load(adapted.dir).model
    mlm_model = methods.get(name).merge(mlm_model)
    cfg = config.validate({"model": {"path": str(adapted.dir)}, "data": {"train": str(texts)}})
    with predict.model_source(cfg.model) as model_cfg:  # the run layer turns a run into a model directory
        classifier, _ = classification.build_model(model_cfg, {"labels": ["neg", "pos"]})
    theirs = {k: v for k, v in mlm_model.bert.state_dict().items()}
    ours = classifier.bert.state_dict()
    assert set(theirs) <= set(ours)
    for key, value in theirs.items():  # the merge that wrote the run's weights, run again: the same kernels
        torch.testing.assert_close(ours[key], value, atol=0, rtol=0, msg=key)
    fresh, _ = classification.build_model(config.validate({"model": {"path": str(tiny_bert)}, "data": {"train": "x"}}).model,
                                          {"labels": ["neg", "pos"]})
    query = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(fresh.bert.state_dict()[query], ours[query])  # the mlm run changed the body
    run = tunelab.train(None, [f"model.path={adapted.dir}", f"data.train={texts}", "method.name=lora", "method.r=4",
                               "train.max_steps=2", "train.batch_size=16", "eval.samples=0",
                               f"output_dir={tmp_path / 'classify'}"])
    assert run.summary["steps"] == 2 and "accuracy" in run.summary["eval"]
