"""Causal LM tasks (sft, causal_lm): templates, prompt-loss masking, truncation, packing isolation, training,
generation, every method, peft interop and bad input — on a tiny random Llama with a ChatML template."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FORWARD_OPS, forward_ops, make_chat_rows, size, tol, write_jsonl
from transformers import AutoTokenizer

import tunelab
from tunelab import config, methods
from tunelab.data import chat
from tunelab.errors import TunelabError
from tunelab.tasks import causal_lm as task

SFT_INFO = {"task": "sft", "template": "chat", "train_on_prompt": False, "truncation": "cut"}
MULTI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the opposite of hot?"},
         {"role": "assistant", "content": "Cold."}, {"role": "user", "content": "And of up?"},
         {"role": "assistant", "content": "Down."}]


def _cfg(path, **task_kw):
    return config.validate({"model": {"path": str(path)}, "data": {"train": "x.jsonl"},
                            "task": {"type": "sft", **task_kw}})


def _model(path, info=None):
    cfg = _cfg(path)
    info = dict(info or SFT_INFO)
    torch.manual_seed(0)
    model, tok = task.build_model(cfg.model, info)
    return cfg, model.eval(), tok, info


def _trained_text(feat, tok):
    return tok.decode([t for t in feat["labels"] if t != -100])


# -- templates and masking ---------------------------------------------------------

def test_the_alpaca_template_renders_exactly_and_closes_with_eos(tiny_chat_llama):
    tok = AutoTokenizer.from_pretrained(tiny_chat_llama)
    row = chat._example({"instruction": "Name a colour.", "input": "Think of the sky.", "output": "Blue."}, "alpaca", "text")
    text, spans = chat.render(row["messages"], "alpaca", tok)
    assert text == ("Below is an instruction that describes a task, paired with an input that provides further context. "
                    "Write a response that appropriately completes the request.\n\n### Instruction:\nName a colour.\n\n"
                    "### Input:\nThink of the sky.\n\n### Response:\nBlue.<|im_end|>")
    assert [text[a:b] for a, b in spans] == ["Blue.<|im_end|>"]
    no_input = chat._example({"instruction": "Name a colour.", "output": "Blue."}, "alpaca", "text")
    prompt, _ = chat.render(no_input["messages"][:-1], "alpaca", tok, add_generation_prompt=True)
    assert prompt == ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                      "request.\n\n### Instruction:\nName a colour.\n\n### Response:\n")


def test_the_chat_template_is_the_tokenizers_own_and_spans_are_the_assistant_turns(tiny_chat_llama):
    tok = AutoTokenizer.from_pretrained(tiny_chat_llama)
    text, spans = chat.render(MULTI, "chat", tok)
    assert text == tok.apply_chat_template(MULTI, tokenize=False)
    assert [text[a:b] for a, b in spans] == ["Cold.<|im_end|>", "Down.<|im_end|>"]


def test_labels_are_minus_100_exactly_on_prompt_tokens_of_every_turn(tiny_chat_llama):
    _, _, tok, info = _model(tiny_chat_llama)
    (feat,), stats = task.encode([{"messages": MULTI, "row": 1}], tok, info, 256)
    text, spans = chat.render(MULTI, "chat", tok)
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for t, label, (a, _) in zip(feat["input_ids"], feat["labels"], offsets):
        inside = any(s <= a < e for s, e in spans)
        assert label == (t if inside else -100)
    assert _trained_text(feat, tok) == "Cold.<|im_end|>Down.<|im_end|>"
    assert [t for t in feat["labels"] if t != -100][-1] == tok.eos_token_id  # EOS present and trained on
    assert stats["target_tokens"] == sum(x != -100 for x in feat["labels"])


def test_eos_is_appended_when_the_template_does_not_end_with_it(tiny_gpt2):
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)  # no chat template: alpaca, EOS <|endoftext|>
    info = {**SFT_INFO, "template": chat.resolve_template("auto", tok, "tiny-gpt2")}
    assert info["template"] == "alpaca"
    (feat,), _ = task.encode([{**chat._example({"instruction": "say hi", "output": "hi"}, "alpaca", "text"), "row": 1}],
                             tok, info, 256)
    assert feat["input_ids"][-1] == tok.eos_token_id and feat["labels"][-1] == tok.eos_token_id
    assert _trained_text(feat, tok) == "hi<|endoftext|>"


def test_train_on_prompt_trains_every_token(tiny_chat_llama):
    _, _, tok, info = _model(tiny_chat_llama, {**SFT_INFO, "train_on_prompt": True})
    (feat,), _ = task.encode([{"messages": MULTI, "row": 1}], tok, info, 256)
    assert feat["labels"] == feat["input_ids"]


def test_truncation_cuts_the_prompt_from_the_left_or_drops_and_counts(tiny_chat_llama):
    _, _, tok, info = _model(tiny_chat_llama)
    long_q = [{"role": "user", "content": "What is the opposite of hot? " * 12}, {"role": "assistant", "content": "Cold."}]
    rows = [{"messages": long_q, "row": 1}, {"messages": MULTI[1:3], "row": 2}]
    (full,), _ = task.encode(rows[:1], tok, info, 512)
    feats, stats = task.encode(rows, tok, info, 40)
    assert stats["cut_prompt"] == 1 and len(feats) == 2
    assert len(feats[0]["input_ids"]) == 40 and feats[0]["input_ids"] == full["input_ids"][-40:]
    assert _trained_text(feats[0], tok) == "Cold.<|im_end|>"
    feats, stats = task.encode(rows, tok, {**info, "truncation": "drop"}, 40)
    assert stats["dropped_too_long"] == 1 and [f["row"] for f in feats] == [2]


# -- packing -----------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_an_example_packed_with_others_has_the_logits_it_has_alone(arch, tiny_chat_llama, tiny_gpt2):
    path = tiny_chat_llama if arch == "llama" else tiny_gpt2
    info = SFT_INFO if arch == "llama" else {**SFT_INFO, "template": "alpaca"}
    _, model, tok, info = _model(path, info)
    rows = [{**chat._example(r, "messages", "text"), "row": i} for i, r in enumerate(make_chat_rows(5, seed=4))]
    feats, _ = task.encode(rows, tok, info, 60)
    packed = task.pack(feats, 60 * 3)
    assert len(packed) < len(feats) and sum(r["examples"] for r in packed) == len(feats)
    batch = task.collate(packed, tok.pad_token_id)
    with torch.no_grad():
        hidden = task._hidden(model, batch)
        for row, f in enumerate(packed):
            starts = [i for i, p in enumerate(f["position_ids"]) if p == 0]
            for start, end in zip(starts, starts[1:] + [len(f["position_ids"])]):
                ids = f["input_ids"][start:end]
                alone = task._hidden(model, task.collate([{"input_ids": ids, "labels": ids}], tok.pad_token_id))[0]
                head = model.get_output_embeddings()
                # a forward pass over a packed row of up to 180 tokens (FFN up to GPT-2's 128)
                expected = head(alone)
                atol = tol(expected, forward_ops(32, 128, 2, tokens=batch["input_ids"].shape[1]))
                torch.testing.assert_close(head(hidden[row, start:end]), expected, atol=atol, rtol=0)
    # Nobody predicts the first token of the next example.
    assert all(f["labels"][p] == -100 for f in packed for p, pos in enumerate(f["position_ids"]) if pos == 0)


# -- the pipeline --------------------------------------------------------------------

def _train(tmp_path, model_path, *extra, name="run", rows=None):
    train = write_jsonl(tmp_path / "train.jsonl", rows or make_chat_rows(160, seed=3))
    return tunelab.train(None, [f"model.path={model_path}", f"data.train={train}", "task.type=sft", "data.dedupe=false",
                                "data.max_length=64", "train.batch_size=8", "train.lr=1e-2", "eval.samples=2",
                                "eval.max_new_tokens=8", f"output_dir={tmp_path / name}", *extra])


def test_a_30_step_lora_run_lowers_validation_loss_and_writes_samples(tiny_chat_llama, tmp_path):
    run = _train(tmp_path, tiny_chat_llama, "method.name=lora", "method.target_modules=all-linear", "train.max_steps=30",
                 "train.eval_every=10")
    s = run.summary
    assert s["eval"]["loss"] < s["base"]["validation"]["loss"] - 0.3
    # exp in float32 here (float64 there): the loss's float32 rounding (|loss| eps) and the exp's own, relative
    assert s["eval"]["perplexity"] == pytest.approx(torch.tensor(s["eval"]["loss"]).exp().item(),
                                                    rel=tol(abs(s["eval"]["loss"]) + 1.0))
    samples = json.loads((run.dir / "samples.json").read_text())
    assert len(samples["before"]) == len(samples["after"]) == 2
    assert samples["after"][0]["prompt"].endswith("<|im_start|>assistant\n")
    report = json.loads((run.dir / "data_report.json").read_text())
    assert report["splits"]["train"]["format"] == "messages" and report["splits"]["train"]["tokens"]["target_tokens"] > 0
    assert json.loads((run.dir / "labels.json").read_text())["template"] == "chat"

    model = tunelab.load(run.dir)
    replies = model.generate(["What is the opposite of hot?", "What is the opposite of up?"], max_new_tokens=8)
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    with pytest.raises(TunelabError, match="use generate"):
        model.predict("hello")
    held_out = write_jsonl(tmp_path / "held_out.jsonl", make_chat_rows(20, seed=9))
    metrics = model.evaluate(held_out)
    assert metrics["target_tokens"] > 0 and metrics["loss"] < s["base"]["validation"]["loss"]


def test_packing_trains_through_the_pipeline(tiny_chat_llama, tmp_path):
    run = _train(tmp_path, tiny_chat_llama, "method.name=lora", "train.max_steps=6", "data.packing=true")
    report = json.loads((run.dir / "data_report.json").read_text())
    assert report["splits"]["train"]["packed_rows"] < report["splits"]["train"]["tokens"]["examples"]
    assert run.summary["eval"]["loss"] < run.summary["base"]["validation"]["loss"]


def test_continued_pretraining_on_a_text_file(tiny_chat_llama, tmp_path):
    text = "\n\n".join(f"The opposite of {a} is {b}. " * 3 for a, b in [("hot", "cold"), ("up", "down")] * 20)
    (tmp_path / "corpus.txt").write_text(text)
    run = tunelab.train(None, [f"model.path={tiny_chat_llama}", f"data.train={tmp_path / 'corpus.txt'}",
                               "task.type=causal_lm", "data.dedupe=false", "data.max_length=32", "train.max_steps=10",
                               "train.lr=1e-2", "method.name=full", "eval.samples=1", "eval.max_new_tokens=4",
                               f"output_dir={tmp_path / 'cpt'}"])
    assert run.summary["eval"]["loss"] < run.summary["base"]["validation"]["loss"]


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_every_method_runs_an_sft_step(name, tiny_chat_llama, tiny_gpt2, tmp_path):
    path = tiny_gpt2 if name == "bitfit" else tiny_chat_llama  # the Llama has no biases for BitFit
    extra = {"lora": ["method.r=4"], "dora": ["method.r=4"], "qlora": ["method.r=4"], "freeze": ["method.freeze_layers=1"],
             "adapter": ["method.reduction_factor=4"]}.get(name, [])
    run = _train(tmp_path, path, f"method.name={name}", "train.max_steps=1", "eval.samples=1", *extra,
                 rows=make_chat_rows(40, seed=5))
    assert run.summary["steps"] == 1 and run.summary["trainable_params"] > 0
    assert tunelab.load(run.dir).generate("What is the opposite of hot?", max_new_tokens=3)[0] is not None


def test_an_exported_lora_adapter_loads_in_peft_with_the_same_logits(tiny_chat_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = _train(tmp_path, tiny_chat_llama, "method.name=lora", "method.target_modules=all-linear", "train.max_steps=5")
    ours = tunelab.load(run.dir)
    batch = dict(ours.tokenizer(["What is the opposite of hot?"], return_tensors="pt"))
    with torch.no_grad():
        expected = ours.model(**batch).logits
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_chat_llama), run.dir / "adapter")
        got = peft_model.eval()(**batch).logits
    torch.testing.assert_close(got, expected, atol=tol(expected, FORWARD_OPS), rtol=0)


# -- bad input -----------------------------------------------------------------------

BAD_ROWS = {
    "missing output": ({"instruction": "Name a colour."}, r"row 2: no 'output' field"),
    "empty assistant": ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]},
                        r"row 2: turn 2 is an empty assistant turn"),
    "out of order": ({"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hello"}]},
                     r"row 2: roles are out of order: turn 1 is assistant, expected user"),
    "no reply": ({"messages": [{"role": "user", "content": "Hi"}]}, r"row 2: ends with a user turn"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_are_named_with_their_fix(case, tiny_chat_llama, tmp_path):
    bad, message = BAD_ROWS[case]
    good = make_chat_rows(1, fmt="alpaca" if "instruction" in bad else "messages")[0]
    write_jsonl(tmp_path / "bad.jsonl", [good, bad] + make_chat_rows(10, seed=1, fmt="alpaca" if "instruction" in bad else "messages"))
    cfg = config.validate({"model": {"path": str(tiny_chat_llama)}, "data": {"train": str(tmp_path / "bad.jsonl")},
                           "task": {"type": "sft"}})
    with pytest.raises(TunelabError, match=message) as e:
        task.load_splits(cfg, 0)
    assert "fix or remove the row" in str(e.value)


def test_dropping_every_over_long_example_says_what_to_change(tiny_chat_llama, tmp_path):
    with pytest.raises(TunelabError, match="raise data.max_length or set data.truncation=cut"):
        _train(tmp_path, tiny_chat_llama, "method.name=lora", "data.truncation=drop", "data.max_length=8",
               "train.max_steps=1")
    assert not (tmp_path / "run").exists()


def test_asking_for_a_chat_template_the_tokenizer_lacks(tiny_gpt2, tmp_path):
    with pytest.raises(TunelabError, match="has no chat template. Set task.template=alpaca"):
        _train(tmp_path, tiny_gpt2, "method.name=lora", "task.template=chat", "train.max_steps=1")


def test_packing_is_refused_where_it_cannot_work(tiny_chat_llama):
    base = {"model": {"path": "m"}, "data": {"train": "x.jsonl", "packing": True}}
    with pytest.raises(TunelabError, match="applies to task.type sft and causal_lm"):
        config.validate(base)
    with pytest.raises(TunelabError, match="virtual tokens are prepended once per row"):
        config.validate({**base, "task": {"type": "sft"}, "method": {"name": "prompt"}})


def test_generate_command_prompt_and_batch(tiny_chat_llama, tmp_path):
    from typer.testing import CliRunner

    from tunelab.cli import app

    run = _train(tmp_path, tiny_chat_llama, "method.name=lora", "train.max_steps=2")
    runner = CliRunner()
    res = runner.invoke(app, ["generate", str(run.dir), "--prompt", "What is the opposite of hot?", "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is the opposite of up?"},
                                             {"messages": [{"role": "user", "content": "Hi"}]}])
    res = runner.invoke(app, ["generate", str(run.dir), "--input", str(tmp_path / "prompts.jsonl"), "--output",
                              str(tmp_path / "out.jsonl"), "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(out) == 2 and all(isinstance(o["response"], str) for o in out)
    res = runner.invoke(app, ["generate", str(run.dir), "--chat", "--max-new-tokens", "4"], input="Hi\n/exit\n")
    assert res.exit_code == 0, res.output


def test_a_merged_export_generates_what_the_adapter_run_generates(tiny_chat_llama, tmp_path):
    from typer.testing import CliRunner

    from tunelab import export
    from tunelab.cli import app
    from tunelab.predict import TunedModel

    run = _train(tmp_path, tiny_chat_llama, "method.name=lora", "method.target_modules=all-linear", "train.max_steps=8")
    merged = export.run(run.dir, tmp_path / "merged", merge=True)
    prompts = ["What is the opposite of hot?", "What is the opposite of early?"]
    assert TunedModel.from_model_dir(merged).generate(prompts, max_new_tokens=6) == \
        tunelab.load(run.dir).generate(prompts, max_new_tokens=6)
    res = CliRunner().invoke(app, ["generate", str(merged), "--prompt", prompts[0], "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output


def test_group_by_length_batches_similar_lengths_and_still_sees_every_example():
    from tunelab.training import loop

    cfg = config.validate({"model": {"path": "m"}, "data": {"train": "x.jsonl"},
                           "train": {"batch_size": 4, "group_by_length": True}}).train
    lengths = [(i * 37) % 101 for i in range(400)]
    stream = loop.batch_stream(len(lengths), cfg, torch.Generator().manual_seed(0), lengths)
    batches = [c for _ in range(100) for c in next(stream)[1]]
    assert sorted(i for b in batches for i in b) == list(range(400))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 5  # random batches of 4 would spread ~60
    assert [len(b) for b in batches[:5]] == [4] * 5


def test_padding_free_batches_train_exactly_as_padded_ones(tiny_chat_llama, tmp_path):
    """Each micro-batch packed into rows, each example at its own positions and attending only to itself: the same loss
    step by step as padded rows (same examples and targets per step), without a single pad token."""
    runs = {pf: _train(tmp_path, tiny_chat_llama, "method.name=full", "train.max_steps=6", "train.log_every=1",
                       "train.grad_accum=2", "eval.samples=0", "eval.forgetting=none", f"train.padding_free={pf}",
                       name=f"pf-{pf}")
            for pf in ("false", "true")}
    logs = {pf: [json.loads(x) for x in (r.dir / "metrics.jsonl").read_text().splitlines()] for pf, r in runs.items()}
    losses = {pf: [x["loss"] for x in recs if x["type"] == "train"] for pf, recs in logs.items()}
    tokens = {pf: [x["tokens"] for x in recs if x["type"] == "train"] for pf, recs in logs.items()}
    assert len(losses["true"]) == 6
    # Mean token NLLs: per token a forward pass over up to 64 tokens and a log-softmax over the vocabulary, of
    # terms up to 2 max |logit| + log(vocab) (the trained model's logits, as the largest seen)
    ours = tunelab.load(runs["false"].dir)
    with torch.no_grad():
        logits = ours.model(**ours.tokenizer(["What is the opposite of hot?"], return_tensors="pt")).logits
    vocab = logits.shape[-1]
    atol = tol(2 * size(logits) + math.log(vocab), forward_ops(32, 64, 2, tokens=64) + vocab)
    assert losses["true"] == pytest.approx(losses["false"], abs=atol)
    assert tokens["true"] == tokens["false"]  # non-padding tokens, the same ones
    assert runs["true"].summary["eval"]["loss"] == pytest.approx(runs["false"].summary["eval"]["loss"], abs=atol)


@pytest.fixture(scope="module")
def tiny_chat_falcon(tiny_chat_llama, tmp_path_factory):
    """A 2-layer Falcon with tiny_chat_llama's tokenizer: its attention lets packed examples see each other (OPT's
    did too, until tunelab ran a packed row's examples one at a time: ops/packed_attention.py; Falcon's is out of
    that path's reach)."""
    from transformers import FalconConfig, FalconForCausalLM

    path = tmp_path_factory.mktemp("models") / "tiny-chat-falcon"
    tok = AutoTokenizer.from_pretrained(tiny_chat_llama)
    torch.manual_seed(0)
    FalconForCausalLM(FalconConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                   bos_token_id=tok.bos_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _padding_free_records(run) -> list[dict]:
    return [r for r in map(json.loads, (run.dir / "metrics.jsonl").read_text().splitlines()) if r["type"] == "padding_free"]


def test_padding_free_is_on_by_default_where_the_model_keeps_packed_examples_apart(tiny_chat_llama, tmp_path):
    cfg = config.load(None, [f"model.path={tiny_chat_llama}", "data.train=x.jsonl", "task.type=sft"])
    assert cfg.train.padding_free == "auto"
    run = _train(tmp_path, tiny_chat_llama, "method.name=lora", "train.max_steps=2", "eval.samples=0",
                 "eval.forgetting=none")
    assert _padding_free_records(run) == [{"type": "padding_free", "on": True}]
    assert task.packing_fault(tunelab.load(run.dir).model) is None


def test_padding_free_falls_back_on_a_model_whose_attention_mixes_packed_examples(tiny_chat_falcon, tmp_path, capsys):
    run = _train(tmp_path, tiny_chat_falcon, "method.name=full", "train.max_steps=2", "eval.samples=0",
                 "eval.forgetting=none", name="auto")
    (record,) = _padding_free_records(run)
    assert record["on"] is False and "does not keep packed examples apart" in record["why_off"]
    assert "train.padding_free=auto: padded rows" in capsys.readouterr().out
    with pytest.raises(TunelabError, match="cannot be trained on packed rows.*does not keep packed examples apart"):
        _train(tmp_path, tiny_chat_falcon, "method.name=full", "train.max_steps=2", "train.padding_free=true",
               name="forced")
    assert not (tmp_path / "forced" / "model").exists()


@pytest.mark.parametrize("extra", [["task.type=token_classification"], ["task.type=sft", "data.packing=true"],
                                   ["task.type=sft", "method.name=prompt"]])
def test_padding_free_auto_is_off_where_it_does_not_apply(tiny_chat_llama, extra):
    cfg = config.load(None, [f"model.path={tiny_chat_llama}", "data.train=x.jsonl", *extra])
    assert cfg.train.padding_free is False


@pytest.mark.parametrize("extra,message", [
    (["task.type=token_classification"], "applies to task.type sft, causal_lm, classification, regression, multilabel, not token_class"),
    (["data.packing=true"], "both pack examples"),
    (["method.name=prompt"], "virtual tokens"),
])
def test_padding_free_refuses_what_it_cannot_do(tmp_path, tiny_chat_llama, extra, message):
    overrides = [f"model.path={tiny_chat_llama}", "data.train=x.jsonl", "task.type=sft", "train.padding_free=true", *extra]
    with pytest.raises(tunelab.TunelabError, match=message):
        config.load(None, overrides)
