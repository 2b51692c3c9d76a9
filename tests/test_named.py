"""Several named adapters on one base: switching gives each adapter's own outputs exactly, the base
is shared (not copied), each saves and loads on its own, and methods that change the base refuse."""

from __future__ import annotations

import pytest
import torch
from conftest import FORWARD_OPS, PROBS_TOL, make_rows, tol
from test_method_matrix import INFO, METHOD_ARGS, _batch, _build, _logits, tiny_llama  # noqa: F401  (fixture)

from tunelab import config, methods, models
from tunelab.errors import TunelabError
from tunelab.methods import named
from tunelab.tasks import classification as task

SWITCHABLE = sorted(named.SWITCHABLE)


@pytest.fixture(params=["bert", "gpt2", "llama"])
def arch(request):
    fixture = {"bert": "tiny_bert", "gpt2": "tiny_gpt2", "llama": "tiny_llama"}[request.param]
    return request.param, request.getfixturevalue(fixture)


def _method_cfg(name: str, **extra):
    return config.validate({"model": {"path": "x"}, "data": {"train": "x.jsonl"},
                            "method": {"name": name, **METHOD_ARGS.get(name, {}), **extra}}).method


def _perturb(params, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))


def _own_params(model, head):
    return [p for n, p in model.named_parameters()
            if p.requires_grad and not any(n == h or n.startswith(h + ".") for h in head)]


def _single(path, name, seed, batch):
    """The reference: a fresh base with only this one adapter, perturbed with `seed`."""
    cfg, model, _ = _build(path, name)
    head = models.head_modules(model)
    torch.manual_seed(seed)  # the adapter's own random init
    model = methods.get(name).apply(model, cfg.method, head).eval()
    _perturb(_own_params(model, head), seed)
    return _logits(model, batch)


@pytest.mark.parametrize("first,second", [(m, m) for m in SWITCHABLE] + [("lora", "prompt"), ("prefix", "ia3"),
                                                                          ("adapter", "dora"), ("ptuning", "prefix")])
def test_switching_gives_each_adapters_own_outputs_and_the_base_is_shared(arch, first, second, tmp_path):
    _, path = arch
    cfg, model, tok = _build(path, first)
    batch, _ = _batch(tok)
    base = _logits(model, batch)
    head = models.head_modules(model)
    base_weights = {n: p for n, p in model.named_parameters()}
    torch.manual_seed(1)
    model = methods.prepare(model, cfg.method, head).eval()
    _perturb(_own_params(model, head), 1)
    torch.manual_seed(2)
    model = methods.add_adapter(model, "b", _method_cfg(second), head).eval()
    _perturb(_own_params(model, head), 2)
    assert named.names(model) == ["default", "b"] and named.active(model) == "b"

    # Same seeds on a fresh single-adapter model give the same tensors: the references.
    expected_a, expected_b = _single(path, first, 1, batch), _single(path, second, 2, batch)
    torch.testing.assert_close(_logits(model, batch), expected_b, atol=0, rtol=0)
    methods.set_adapter(model, "default")
    torch.testing.assert_close(_logits(model, batch), expected_a, atol=0, rtol=0)
    with methods.adapters_disabled(model):
        torch.testing.assert_close(_logits(model, batch), base, atol=0, rtol=0)
    methods.set_adapter(model, "b")
    torch.testing.assert_close(_logits(model, batch), expected_b, atol=0, rtol=0)
    # One copy of the base: every base weight is still the very tensor the base model had.
    live = {id(p) for p in model.parameters()}
    assert sum(id(p) in live for n, p in base_weights.items() if not n.startswith(tuple(head))) == \
        sum(1 for n in base_weights if not n.startswith(tuple(head)))

    # Each adapter saves on its own (whichever is active) and loads alone onto a fresh base.
    for name, method, expected in (("default", first, expected_a), ("b", second, expected_b)):
        out = tmp_path / name
        named.save(model, name, out, str(path))
        assert named.active(model) == "b"
        _, fresh, _ = _build(path, method)
        fresh = methods.get(method).load(fresh, out).eval()
        torch.testing.assert_close(_logits(fresh, batch), expected, atol=tol(expected, FORWARD_OPS), rtol=0)


def test_a_saved_adapter_dir_is_added_by_name_and_its_method_is_read_from_it(tiny_bert, tmp_path):
    cfg, model, tok = _build(tiny_bert, "lora")
    batch, _ = _batch(tok)
    head = models.head_modules(model)
    model = methods.prepare(model, cfg.method, head).eval()
    _perturb(_own_params(model, head), 1)
    methods.get("lora").save(model, tmp_path / "lora", str(tiny_bert), head)
    expected = _logits(model, batch)

    _, other, _ = _build(tiny_bert, "ia3")
    other = methods.prepare(other, _method_cfg("ia3"), head).eval()
    other = methods.add_adapter(other, "mine", tmp_path / "lora", head).eval()
    assert named._registry(other)["adapters"]["mine"]["method"] == "lora"
    torch.testing.assert_close(_logits(other, batch), expected, atol=tol(expected, FORWARD_OPS), rtol=0)


def test_one_optimizer_trains_two_adapters_and_a_step_moves_only_the_active_one(tiny_bert):
    cfg, model, tok = _build(tiny_bert, "lora")
    batch, _ = _batch(tok)
    head = models.head_modules(model)
    model = methods.prepare(model, cfg.method, head)
    model = methods.add_adapter(model, "b", _method_cfg("lora"), head)
    params = named.parameters(model)
    a_params = [p for _, m in named._registry(model)["adapters"]["default"]["modules"].values() for p in m.parameters()
                if p.requires_grad]
    assert len(params) == 2 * len([p for p in model.parameters() if p.requires_grad])
    assert not {id(p) for p in a_params} & {id(p) for p in model.parameters()}  # parked: not in the tree
    opt = torch.optim.AdamW(params, lr=1e-2)
    for active in ("b", "default"):
        methods.set_adapter(model, active)
        before = [p.detach().clone() for p in params]
        opt.zero_grad(set_to_none=True)
        (task.loss(model.train(), batch, {}) / task.count(batch)).backward()
        opt.step()
        live = {id(p) for p in model.parameters()}
        for p, b in zip(params, before):
            assert torch.equal(p, b) != (id(p) in live), "exactly the active adapter (and its head) should move"


def test_the_new_adapters_head_starts_from_the_bases_not_from_the_trained_one(tiny_bert):
    cfg, model, tok = _build(tiny_bert, "lora")
    head = models.head_modules(model)
    initial = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    model = methods.prepare(model, cfg.method, head)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)  # "trained"
    trained = model.classifier
    model = methods.add_adapter(model, "b", _method_cfg("lora"), head)
    assert model.classifier is not trained
    for k, v in model.classifier.state_dict().items():
        assert torch.equal(v, initial[k])
    methods.set_adapter(model, "default")
    assert model.classifier is trained


@pytest.mark.parametrize("name", ["full", "freeze", "bitfit", "qlora"])
def test_methods_that_change_the_base_refuse_to_share_it(tiny_bert, name):
    cfg, model, _ = _build(tiny_bert, name)
    head = models.head_modules(model)
    model = methods.prepare(model, cfg.method, head)
    with pytest.raises(TunelabError, match="changes the base model itself"):
        methods.add_adapter(model, "b", _method_cfg("lora"), head)
    _, fresh, _ = _build(tiny_bert, "lora")
    fresh = methods.prepare(fresh, _method_cfg("lora"), head)
    with pytest.raises(TunelabError, match="cannot be added as a named adapter"):
        methods.add_adapter(fresh, "b", _method_cfg(name), head)


def test_lora_training_shared_biases_is_refused_and_the_model_is_left_as_it_was(tiny_bert):
    cfg, model, tok = _build(tiny_bert, "lora")
    batch, _ = _batch(tok)
    head = models.head_modules(model)
    model = methods.prepare(model, cfg.method, head).eval()
    _perturb(_own_params(model, head), 1)
    before = _logits(model, batch)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(TunelabError, match="bias=none"):
        methods.add_adapter(model, "b", _method_cfg("lora", bias="all"), head)
    assert named.names(model) == ["default"] and named.active(model) == "default"
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == trainable
    torch.testing.assert_close(_logits(model.eval(), batch), before, atol=0, rtol=0)


def test_clear_errors_for_unknown_and_duplicate_names_and_unregistered_adapters(tiny_bert):
    cfg, model, _ = _build(tiny_bert, "lora")
    head = models.head_modules(model)
    plain = methods.get("lora").apply(model, cfg.method, head)  # applied directly, not by name
    with pytest.raises(TunelabError, match="not added by name"):
        methods.add_adapter(plain, "b", _method_cfg("lora"), head)
    _, model, _ = _build(tiny_bert, "lora")
    model = methods.prepare(model, cfg.method, head)
    with pytest.raises(TunelabError, match="already has an adapter named 'default'"):
        methods.add_adapter(model, "default", _method_cfg("lora"), head)
    with pytest.raises(TunelabError, match="No adapter named 'x'.*default"):
        methods.set_adapter(model, "x")


def _run(tmp_path, model_path, method, name, seed):
    from conftest import write_jsonl

    import tunelab

    train = write_jsonl(tmp_path / f"train-{name}.jsonl", make_rows(80, seed=seed))
    tunelab.train(None, [f"model.path={model_path}", f"data.train={train}", f"method.name={method}",
                         "train.max_steps=4", "train.lr=5e-2", "eval.linear_probe=false", f"output_dir={tmp_path / name}"])
    return tmp_path / name


def test_a_loaded_run_takes_a_second_run_as_a_named_adapter(tiny_bert, tmp_path):
    import tunelab

    texts = ["great film and a charming cast", "a dull , tedious plot"]
    run_a, run_b = _run(tmp_path, tiny_bert, "lora", "a", 1), _run(tmp_path, tiny_bert, "prompt", "b", 2)
    alone_a, alone_b = tunelab.load(run_a).predict(texts), tunelab.load(run_b).predict(texts)
    assert alone_a != alone_b
    both = tunelab.load(run_a).add_adapter("b", run_b)
    assert both.adapters == ["default", "b"]
    for got, want in ((both.predict(texts), alone_b), (both.set_adapter("default").predict(texts), alone_a)):
        for g, w in zip(got, want):
            assert g["label"] == w["label"] and g["score"] == pytest.approx(w["score"], abs=PROBS_TOL)

    full = _run(tmp_path, tiny_bert, "full", "full", 3)
    with pytest.raises(TunelabError, match="only adapter runs"):
        tunelab.load(run_a).add_adapter("f", full)
