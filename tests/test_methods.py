"""Methods and the optimizer: exact trainable counts (computed by hand from each model's own
module tree), what one optimizer step touches, AdamW parameter groups, the LR schedule."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import make_rows, tol
from transformers import AutoModelForSequenceClassification

from tunelab import methods, models
from tunelab.config import FreezeConfig, FullConfig, LoraConfig, ModelConfig, TrainConfig
from tunelab.errors import TunelabError
from tunelab.tasks import classification
from tunelab.training import loop, optim

INFO = {"labels": ["neg", "pos"]}


def _load(path):
    torch.manual_seed(0)  # the head is freshly initialised on every load
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def _anatomy(model) -> dict[str, list[torch.nn.Module]]:
    """The parts of each tiny model, read off its own attributes (not tunelab's helpers)."""
    if model.config.model_type == "bert":
        return {"embeddings": [model.bert.embeddings], "blocks": list(model.bert.encoder.layer), "top": [],
                "head": [model.bert.pooler, model.classifier]}
    assert model.config.model_type == "gpt2"
    t = model.transformer
    return {"embeddings": [t.wte, t.wpe], "blocks": list(t.h), "top": [t.ln_f], "head": [model.score]}


def _params(mods) -> list[torch.nn.Parameter]:
    return [p for m in mods for p in m.parameters()]


def _numel(mods) -> int:
    return sum(p.numel() for p in _params(mods))


@pytest.fixture(params=["bert", "gpt2"])
def model_dir(request, tiny_bert, tiny_gpt2):
    return tiny_bert if request.param == "bert" else tiny_gpt2


def test_anatomy_covers_every_parameter(model_dir):
    # Guards the hand computation below: the listed parts are the whole model, each parameter once.
    model = _load(model_dir)
    parts = _anatomy(model)
    ids = [id(p) for mods in parts.values() for p in _params(mods)]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("arch,expected", [("bert", ["bert.pooler", "classifier"]), ("gpt2", ["score"])])
def test_head_modules_per_architecture(arch, expected, tiny_bert, tiny_gpt2):
    model = _load(tiny_bert if arch == "bert" else tiny_gpt2)
    assert models.head_modules(model) == expected


def test_full_trains_everything(model_dir):
    model = _load(model_dir)
    for p in model.parameters():
        p.requires_grad_(False)  # full must switch everything back on
    model = methods.get("full").apply(model, FullConfig(name="full"), models.head_modules(model))
    total = sum(p.numel() for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert models.count_params(model) == (total, total)


@pytest.mark.parametrize("freeze_embeddings", [True, False])
@pytest.mark.parametrize("n", [0, 1, 2, "all"])
def test_freeze_trainable_counts(model_dir, n, freeze_embeddings):
    model = _load(model_dir)
    parts = _anatomy(model)
    n_blocks = len(parts["blocks"])
    k = n_blocks if n == "all" else n
    trainable_mods = parts["blocks"][k:] + parts["head"]
    if k < n_blocks:
        trainable_mods += parts["top"]  # the final norm trains unless every block is frozen
    if not freeze_embeddings:
        trainable_mods += parts["embeddings"]
    expected = _numel(trainable_mods)
    total = sum(p.numel() for p in model.parameters())

    cfg = FreezeConfig(name="freeze", freeze_layers=n, freeze_embeddings=freeze_embeddings)
    model = methods.get("freeze").apply(model, cfg, models.head_modules(model))

    assert models.count_params(model) == (expected, total)
    # Not only the count: exactly these tensors are trainable.
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in _params(trainable_mods)}
    assert 0 < expected <= total


def test_freeze_counts_pinned_for_tiny_bert(tiny_bert):
    # Pinned numbers (hidden 32, intermediate 64, vocab 57, 64 positions, 2 labels), worked out by hand:
    # block = 4 * (32*32+32) [q,k,v,attn out] + 2 * 2*32 [2 LayerNorms] + (32*64+64) + (64*32+32) = 8544
    # pooler = 32*32+32 = 1056, classifier = 32*2+2 = 66
    model = _load(tiny_bert)
    block = 4 * (32 * 32 + 32) + 2 * 64 + (32 * 64 + 64) + (64 * 32 + 32)
    assert _numel([model.bert.encoder.layer[0]]) == block
    head = (32 * 32 + 32) + (32 * 2 + 2)
    model = methods.get("freeze").apply(model, FreezeConfig(name="freeze", freeze_layers=1), models.head_modules(model))
    assert models.count_params(model)[0] == block + head


def test_freeze_layers_more_than_blocks_is_an_error(model_dir):
    model = _load(model_dir)
    with pytest.raises(TunelabError, match=r"method\.freeze_layers=3 .*only 2 transformer blocks"):
        methods.get("freeze").apply(model, FreezeConfig(name="freeze", freeze_layers=3), models.head_modules(model))


def test_trainable_summary_numbers(model_dir):
    model = _load(model_dir)
    parts = _anatomy(model)
    model = methods.get("freeze").apply(model, FreezeConfig(name="freeze", freeze_layers="all"), models.head_modules(model))
    trainable, total = _numel(parts["head"]), sum(p.numel() for p in model.parameters())
    line = models.trainable_summary(model)
    m = re.fullmatch(r"trainable: ([\d,]+) / total: ([\d,]+) \(([\d.]+)%\)", line)
    assert m, line
    assert int(m.group(1).replace(",", "")) == trainable
    assert int(m.group(2).replace(",", "")) == total
    # printed to 4 decimals: half the last digit, and the float64 division's rounding
    assert float(m.group(3)) == pytest.approx(100 * trainable / total, abs=0.5e-4 + tol(100.0, 2, torch.float64))
    assert f"{total:,}" in line  # thousands separators


# -- what one optimizer step touches ----------------------------------------------

METHOD_CFGS = {
    "full": FullConfig(name="full"),
    "freeze": FreezeConfig(name="freeze", freeze_layers=1),
    "lora": LoraConfig(name="lora", r=4, alpha=8, dropout=0.0),
}


@pytest.mark.parametrize("name", list(METHOD_CFGS))
def test_one_step_changes_only_trainable_params(name, tiny_bert):
    torch.manual_seed(0)
    model, tok = classification.build_model(ModelConfig(path=str(tiny_bert), device="cpu"), INFO)
    head = models.head_modules(model)
    model = methods.get(name).apply(model, METHOD_CFGS[name], head)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = set(before) - trainable
    assert trainable and (frozen or name == "full")

    feats, _ = classification.encode(make_rows(16, seed=3), tok, INFO, 64)
    cfg = TrainConfig(max_steps=1, batch_size=8, lr=1e-2, weight_decay=0.01, log_every=1)
    loop.run(model, classification, feats, feats[:8], INFO, cfg, head, tok.pad_token_id, torch.device("cpu"), 8, lambda r: None)

    after = dict(model.named_parameters())
    unchanged_frozen = [n for n in frozen if not torch.equal(after[n], before[n])]
    assert not unchanged_frozen, f"frozen parameters changed: {unchanged_frozen}"
    # Every trainable tensor moved (LoRA's A has no gradient at step 1 since B starts at 0, but it is decayed).
    stuck = [n for n in trainable if torch.equal(after[n], before[n])]
    assert not stuck, f"trainable parameters did not change: {stuck}"
    if name == "lora":
        assert all(".lora_" in n or any(n.startswith(h + ".") for h in head) for n in trainable)
        assert any(n.endswith("lora_B.weight") for n in trainable)


# -- optimizer groups --------------------------------------------------------------

def _is_no_decay(name: str) -> bool:
    # Biases and every norm's gain/bias: BERT's LayerNorm, GPT-2's ln_1/ln_2/ln_f.
    return name.endswith(".bias") or "LayerNorm" in name or re.search(r"\.ln_(\d|f)\.", name) is not None


@pytest.mark.parametrize("head_lr", [5e-3, None])
def test_optimizer_groups(model_dir, head_lr):
    model = _load(model_dir)
    head = models.head_modules(model)
    model = methods.get("freeze").apply(model, FreezeConfig(name="freeze", freeze_layers=1), head)
    cfg = TrainConfig(lr=1e-3, head_lr=head_lr, weight_decay=0.1)
    groups = optim.param_groups(model, head, cfg)

    names = [n for g in groups for n in g["param_names"]]
    assert len(names) == len(set(names))
    params = dict(model.named_parameters())
    assert set(names) == {n for n, p in params.items() if p.requires_grad}  # frozen params absent
    assert all(p.requires_grad for g in groups for p in g["params"])
    saw_head = saw_no_decay = False
    for g in groups:
        assert [id(p) for p in g["params"]] == [id(params[n]) for n in g["param_names"]]
        for n in g["param_names"]:
            is_head = n.startswith(("bert.pooler.", "classifier.", "score."))
            saw_head |= is_head
            saw_no_decay |= _is_no_decay(n)
            assert g["weight_decay"] == (0.0 if _is_no_decay(n) else 0.1), n
            assert g["lr"] == ((head_lr or 1e-3) if is_head else 1e-3), n
    assert saw_head and saw_no_decay

    opt, _, _ = optim.build(model, head, cfg, total_steps=10)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(g["lr"], g["weight_decay"]) for g in groups]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)


# -- learning-rate schedule ----------------------------------------------------------

def test_lr_factor_values():
    f = optim.lr_factor
    warm, total = 4, 20
    # linear warmup to the peak, reached at the first step after warmup
    warmup = [f(s, warm, total, "linear") for s in range(warm + 1)]
    assert warmup == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(a < b for a, b in zip(warmup, warmup[1:]))
    for kind in ("linear", "cosine", "constant"):
        assert f(0, warm, total, kind) == pytest.approx(0.2)
        assert f(warm, warm, total, kind) == pytest.approx(1.0)
    # linear decay to 0 at `total`
    assert f(8, warm, total, "linear") == pytest.approx(0.75)
    assert f(12, warm, total, "linear") == pytest.approx(0.5)
    assert f(19, warm, total, "linear") == pytest.approx(1 / 16)
    assert f(20, warm, total, "linear") == pytest.approx(0.0)
    # cosine: half at mid-decay, 0 at the end
    assert f(8, warm, total, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert f(12, warm, total, "cosine") == pytest.approx(0.5)
    assert f(16, warm, total, "cosine") == pytest.approx(0.5 * (1 + math.cos(3 * math.pi / 4)))
    assert f(20, warm, total, "cosine") == pytest.approx(0.0, abs=tol(1.0, 3, torch.float64))  # 0.5 (1 + cos pi)
    assert [f(s, warm, total, "constant") for s in range(warm, total)] == [1.0] * (total - warm)
    # no warmup: the very first step runs at the peak
    assert f(0, 0, 10, "linear") == 1.0 and f(5, 0, 10, "linear") == pytest.approx(0.5)
    for kind in ("linear", "cosine"):
        decay = [f(s, warm, total, kind) for s in range(warm, total + 1)]
        assert all(a >= b for a, b in zip(decay, decay[1:]))


@pytest.mark.parametrize("kind,warmup_kw,warm", [("cosine", {"warmup_steps": 3}, 3), ("linear", {"warmup_ratio": 0.25}, 2)])
def test_scheduler_follows_lr_factor(kind, warmup_kw, warm):
    layer = torch.nn.Linear(2, 2)
    cfg = TrainConfig(lr=1e-3, scheduler=kind, **warmup_kw)
    total = 8
    opt, sched, _ = optim.build(layer, [], cfg, total)
    seen = []
    for _ in range(total):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert seen == pytest.approx([1e-3 * optim.lr_factor(s, warm, total, kind) for s in range(total)])
    assert seen[warm] == pytest.approx(1e-3)


def test_ia3_scales_are_not_decayed_towards_zero(tiny_bert):
    from tunelab.config import IA3Config, TrainConfig
    from tunelab.methods import ia3

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    head = models.head_modules(model)
    ia3.apply(model, IA3Config(name="ia3"), head)
    groups = optim.param_groups(model, head, TrainConfig(weight_decay=0.1))
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["param_names"]}
    assert any(n.endswith("ia3_l") for g in groups for n in g["param_names"])
    assert not any(n.endswith("ia3_l") for n in decayed)


def test_every_method_declares_its_facts():
    """What other modules ask of a method is written once, in its own file (DPO's reference, advise, the matrix)."""
    for name, module in methods.METHODS.items():
        assert isinstance(module.CHANGES_BASE, bool) and isinstance(module.MERGEABLE, bool), name
    assert {n for n, m in methods.METHODS.items() if m.CHANGES_BASE} == {"full", "freeze", "bitfit"}
