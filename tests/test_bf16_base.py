"""A bf16 frozen base (`model.dtype: bfloat16`) under every adapter method: what the method trains stays float32.

Per method, on the tiny BERT classifier loaded in bf16: after `methods.prepare` the trainable parameters (the
method's own and the head) are float32 and the frozen base bf16; a training step through the real optimizer
(training/optim.py) gives float32 gradients and float32 AdamW state; the loss over a few steps is finite and
close to the same run over a float32 base; a mergeable method merges into a plain bf16 model whose outputs match
the unmerged one. BitFit trains the base's own biases, so they (and its head) train in bf16 (TRAINABLE_DTYPE "base").
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import make_rows, text_batch, tol
from transformers import AutoModelForSequenceClassification

from tunelab import methods, models
from tunelab.config import LoraConfig, TrainConfig
from tunelab.config.methods import BY_NAME
from tunelab.methods import precision
from tunelab.training import optim

FLOAT32_METHODS = ["lora", "dora", "ia3", "adapter", "prompt", "ptuning", "prefix"]
STEPS = 5
# Tensors rounded to bf16 along one forward pass of the tiny BERT classifier (2 layers): per layer q, k, v, the
# scores, softmax, the weighted values, the output projection, two residual adds and norms, FFN in, GELU, FFN out
# (14); the embeddings' sum and norm, the pooler's dense and tanh, the classifier (5). Independent roundings add up
# like sqrt(n). Each training step moves every trained tensor by an update computed from those rounded values: one
# rounding more per step.
ROUNDINGS = 2 * 14 + 5
BF16_EPS = torch.finfo(torch.bfloat16).eps


@pytest.fixture(scope="module")
def setup(tiny_bert):
    torch.manual_seed(0)  # the classification head is new on every load
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).eval()
    labels = torch.tensor([1 if r["label"] == "pos" else 0 for r in make_rows(8, seed=5)])
    batch = text_batch(tiny_bert, [r["text"] for r in make_rows(8, seed=5)])
    return base, models.head_modules(base), batch, labels


def _prepared(setup, name: str, dtype: torch.dtype, cfg=None):
    base, head, _, _ = setup
    torch.manual_seed(1)  # the same adapter draws over both bases (they are made float32 on either)
    return methods.prepare(copy.deepcopy(base).to(dtype), cfg or BY_NAME[name](name=name), head)


def _train(setup, model, steps: int = STEPS):
    _, head, batch, labels = setup
    opt, _, _ = optim.build(model, head, TrainConfig(lr=1e-2, warmup_steps=0, scheduler="constant"), steps)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(**batch).logits.float(), labels)
        loss.backward()
        grads = {n: p.grad.dtype for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    state = {t.dtype for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim}
    return losses, grads, state


def _dtypes(model, trainable: bool) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.requires_grad is trainable and p.is_floating_point()}


def test_every_method_declares_how_it_trains_over_a_bf16_base():
    for name in methods.METHODS:
        assert methods.get(name).TRAINABLE_DTYPE in ("float32", "base"), name
    assert [n for n in methods.METHODS if methods.get(n).TRAINABLE_DTYPE == "float32"] == [
        "lora", "dora", "ia3", "adapter", "prompt", "ptuning", "prefix", "qlora"]


@pytest.mark.parametrize("name", FLOAT32_METHODS)
def test_float32_training_over_a_bf16_base(setup, name):
    model = _prepared(setup, name, torch.bfloat16)
    assert _dtypes(model, trainable=True) == {torch.float32}
    assert _dtypes(model, trainable=False) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.classifier.parameters())  # the head, upcast

    losses, grads, state = _train(setup, model)
    assert set(grads.values()) == {torch.float32}
    assert state == {torch.float32}
    assert all(math.isfinite(x) for x in losses)
    reference, _, _ = _train(setup, _prepared(setup, name, torch.float32))
    for step, (got, want) in enumerate(zip(losses, reference), start=1):
        assert got == pytest.approx(want, abs=tol(want, math.sqrt(ROUNDINGS + step), torch.bfloat16)), step
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", [n for n in FLOAT32_METHODS if methods.get(n).MERGEABLE])
def test_merge_over_a_bf16_base_gives_a_bf16_model(setup, name):
    _, _, batch, _ = setup
    model = _prepared(setup, name, torch.bfloat16)
    _train(setup, model, steps=2)  # B != 0, the magnitude and the vectors moved: the merge has something to fold
    with torch.no_grad():
        unmerged = model(**batch).logits.float()
        merged = methods.get(name).merge(model)
        got = merged(**batch).logits
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert not any(hasattr(m, precision.MARK) or m._forward_pre_hooks for m in merged.modules())
    assert got.dtype == torch.bfloat16
    # Merging rounds each merged weight to bf16 once more and the head computes in bf16 again: the forward's
    # roundings, on values the size of the logits.
    torch.testing.assert_close(got.float(), unmerged, atol=tol(unmerged, math.sqrt(ROUNDINGS), torch.bfloat16), rtol=0)


def test_bitfit_trains_the_base_biases_in_its_dtype(setup):
    model = _prepared(setup, "bitfit", torch.bfloat16)
    assert methods.get("bitfit").TRAINABLE_DTYPE == "base"
    assert _dtypes(model, trainable=True) == {torch.bfloat16}
    losses, grads, state = _train(setup, model)
    assert set(grads.values()) == {torch.bfloat16} and state == {torch.bfloat16}
    reference, _, _ = _train(setup, _prepared(setup, "bitfit", torch.float32))
    for step, (got, want) in enumerate(zip(losses, reference), start=1):
        assert got == pytest.approx(want, abs=tol(want, math.sqrt(ROUNDINGS + step), torch.bfloat16)), step


def test_a_float32_base_is_left_as_it_is(setup):
    model = _prepared(setup, "lora", torch.float32)
    assert not any(hasattr(m, precision.MARK) or m._forward_pre_hooks for m in model.classifier.modules())


def test_a_saved_float32_head_and_prompt_load_onto_a_bf16_base_unrounded(setup, tmp_path):
    for name in ("lora", "prompt"):
        model = _prepared(setup, name, torch.bfloat16)
        _train(setup, model, steps=1)
        methods.get(name).save(model, tmp_path / name, "base", setup[1])
        cfg = BY_NAME[name](name=name, init_from=str(tmp_path / name))
        loaded = _prepared(setup, name, torch.bfloat16, cfg)
        assert torch.equal(loaded.classifier.weight, model.classifier.weight)  # float32, not rounded to bf16
        assert _dtypes(loaded, trainable=True) == {torch.float32}


def test_a_named_adapter_added_over_a_bf16_base_trains_its_own_float32_head(setup):
    model = _prepared(setup, "lora", torch.bfloat16)
    first = model.classifier
    model = methods.add_adapter(model, "second", LoraConfig(name="lora", r=2), setup[1])
    assert model.classifier is not first and model.classifier.weight.dtype == torch.float32
    _, grads, _ = _train(setup, model, steps=1)
    assert set(grads.values()) == {torch.float32}


def test_the_padding_free_check_accepts_a_bf16_base_and_still_finds_a_leak():
    """train.padding_free checks that packed rows give each example's own hidden states. Over a bf16 base they differ
    by rounding alone, where the matmuls split across threads differently for the two shapes (with one thread they
    are equal): with 2 threads the bench's 58M model (8 blocks of 512) by 1.2 % of the states' size, SmolLM2 by 4.9 %
    and this 12-block model by 1.3 % on this project's x86 CPU, above the fixed 1 % the check once allowed, so a bf16
    base could not train padding-free. A leak still shows: Falcon's attention lets packed examples see each other
    (tunelab's one-example-at-a-time attention does not reach it), and its states move by their own size."""
    from transformers import FalconConfig, FalconForCausalLM, LlamaConfig, LlamaForCausalLM

    from tunelab.tasks import causal_lm

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=512, num_hidden_layers=12, num_attention_heads=8,
                                         intermediate_size=1376)).to(torch.bfloat16)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the tests run on one thread (conftest); training uses every core
    try:
        assert causal_lm.packing_fault(llama) is None
    finally:
        torch.set_num_threads(threads)
    falcon = FalconForCausalLM(FalconConfig(vocab_size=400, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4)).to(torch.bfloat16)
    assert "does not keep packed examples apart" in causal_lm.packing_fault(falcon)


def test_a_run_over_a_bf16_base_loads_back_with_its_float32_head_unrounded(tiny_bert, tmp_path):
    """tunelab.load attaches the adapter as training did: the head upcast first, so its saved float32 weights are
    the ones predict uses (not rounded to the base's bf16)."""
    from conftest import write_jsonl
    from safetensors.torch import load_file

    import tunelab

    train = write_jsonl(tmp_path / "train.jsonl", make_rows(40, seed=4))
    run = tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={train}", "model.dtype=bfloat16",
                               "method.name=lora", "method.r=2", "train.max_steps=2", "train.batch_size=8",
                               "eval.linear_probe=false", "eval.base=false", f"output_dir={tmp_path / 'run'}"])
    saved = load_file(str(run.dir / "adapter" / "adapter_model.safetensors"))
    saved_head = next(t for k, t in saved.items() if k.endswith("classifier.weight"))
    loaded = tunelab.load(run.dir).model
    assert saved_head.dtype == torch.float32
    assert loaded.classifier.weight.dtype == torch.float32
    assert torch.equal(loaded.classifier.weight.detach().cpu(), saved_head)
    assert loaded.bert.encoder.layer[0].attention.self.query.base_layer.weight.dtype == torch.bfloat16
