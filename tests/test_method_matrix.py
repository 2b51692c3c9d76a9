"""One matrix of generic checks over every registered method x tiny architectures (as peft's
test_custom_models): only the method's parameters (and the head) train; save -> load reproduces
outputs; disabling adapters restores the base; merged == unmerged where a method can merge; a
short run lowers the loss. A method added to `methods.METHODS` is covered without edits here.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FORWARD_OPS, make_rows, tol
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tunelab import config, methods, models
from tunelab.errors import TunelabError
from tunelab.tasks import classification as task
from tunelab.training import loop, optim

INFO = {"labels": ["neg", "pos"]}
METHOD_ARGS = {"freeze": {"freeze_layers": 1}, "lora": {"r": 4}, "dora": {"r": 4}, "qlora": {"r": 4}, "adapter": {"reduction_factor": 4}}
# BitFit trains the base's own biases: there is no separate base to fall back to.
NOT_DISABLEABLE = {name for name, m in methods.METHODS.items() if m.CHANGES_BASE}  # they train the base itself
NO_BIAS_ARCHS = {"llama"}


@pytest.fixture(scope="module")
def tiny_llama(tiny_gpt2, tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    path = tmp_path_factory.mktemp("llama") / "tiny-llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                 eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(params=["bert", "gpt2", "llama"])
def arch(request):
    fixture = {"bert": "tiny_bert", "gpt2": "tiny_gpt2", "llama": "tiny_llama"}[request.param]
    return request.param, request.getfixturevalue(fixture)


def _build(path, name):
    cfg = config.validate({"model": {"path": str(path)}, "data": {"train": "x.jsonl"},
                           "method": {"name": name, **METHOD_ARGS.get(name, {})}, "train": {"lr": 1e-3}})
    torch.manual_seed(0)
    model, tok = task.build_model(cfg.model, INFO)
    return cfg, model.eval(), tok


def _batch(tok, n=8, seed=0):
    feats, _ = task.encode(make_rows(n, seed=seed), tok, INFO, 32)
    return task.collate(feats, tok.pad_token_id), feats


def _logits(model, batch):
    with torch.no_grad():
        return task.forward(model, batch)


def _applied(arch, name):
    arch_name, path = arch
    if name == "bitfit" and arch_name in NO_BIAS_ARCHS:
        pytest.skip("Llama has no biases: bitfit refuses it (tested in test_bitfit)")
    cfg, model, tok = _build(path, name)
    batch, feats = _batch(tok)
    base = _logits(model, batch)
    head = models.head_modules(model)
    model = methods.get(name).apply(model, cfg.method, head).eval()  # injected modules start in train mode
    return cfg, model, tok, batch, feats, base, head


def _perturb_method_params(model, head):
    """Move the method's own parameters off their identity init, so the checks see a real adapter."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and not any(n == h or n.startswith(h + ".") for h in head):
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_only_the_methods_params_and_head_change(arch, name):
    cfg, model, tok, batch, _, _, head = _applied(arch, name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt, _, _ = optim.build(model, head, cfg.train, 10)
    model.train()
    (task.loss(model, batch, {}) / task.count(batch)).backward()
    opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        if p.requires_grad:
            assert p.grad is not None, f"{n} is trainable but got no gradient"
        else:
            assert not changed, f"frozen {n} changed"
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_save_then_load_reproduces_outputs(arch, name, tmp_path):
    cfg, model, tok, batch, _, _, head = _applied(arch, name)
    _perturb_method_params(model, head)
    expected = _logits(model.eval(), batch)
    method = methods.get(name)
    out = tmp_path / method.ARTIFACT
    method.save(model, out, cfg.model.path, head)
    tok.save_pretrained(out)
    if method.ARTIFACT == "model":
        fresh, _ = task.build_model(cfg.model, INFO, path=out)
    else:
        fresh, _ = task.build_model(cfg.model, INFO)
        fresh = method.load(fresh, out)
    torch.testing.assert_close(_logits(fresh.eval(), batch), expected, atol=tol(expected, FORWARD_OPS), rtol=0)


@pytest.mark.parametrize("name", sorted(set(methods.METHODS) - NOT_DISABLEABLE))
def test_disabling_adapters_restores_the_base(arch, name):
    _, model, _, batch, _, base, head = _applied(arch, name)
    if methods.get(name).QUANTIZES_BASE:  # its base is the quantized one (test_qlora: close to full precision)
        base = _logits(model, batch)  # untrained adapters add 0: the quantized base exactly
    _perturb_method_params(model, head)
    assert not torch.allclose(_logits(model, batch), base)
    with methods.adapters_disabled(model):
        torch.testing.assert_close(_logits(model, batch), base, atol=0, rtol=0)
    assert not torch.allclose(_logits(model, batch), base)  # and they come back


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_merge_equals_unmerged_or_says_it_cannot(arch, name):
    _, model, _, batch, _, _, head = _applied(arch, name)
    _perturb_method_params(model, head)
    expected = _logits(model, batch)
    try:
        merged = methods.get(name).merge(model)
    except TunelabError as e:
        assert "cannot be merged" in str(e) or "cannot merge" in str(e)
        assert not methods.get(name).MERGEABLE, f"{name} declares MERGEABLE but cannot merge"
        return
    assert methods.get(name).MERGEABLE, f"{name} merges but declares MERGEABLE = False"
    torch.testing.assert_close(_logits(merged, batch), expected, atol=tol(expected, FORWARD_OPS), rtol=0)
    # a merged model is plain transformers: no tunelab module left
    assert not any(hasattr(m, "adapter_disabled") for m in merged.modules())


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_a_short_run_lowers_the_loss(arch, name):
    cfg, model, tok, _, _, _, head = _applied(arch, name)
    feats, _ = task.encode(make_rows(64, seed=2), tok, INFO, 32)
    train_cfg = cfg.train.model_copy(update={"max_steps": 30, "batch_size": 16, "lr": 1e-2 if name not in ("full", "freeze") else 1e-3,
                                             "log_every": 1, "eval_every": 30})
    log = []
    loop.run(model, task, feats, feats[:16], INFO, train_cfg, head, tok.pad_token_id, "cpu", 32, log.append)
    losses = [r["loss"] for r in log if r["type"] == "train"]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, f"{name}: loss went from {first:.4f} to {last:.4f}"
