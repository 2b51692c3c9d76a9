"""What other modules ask of a method is declared in its own file (methods/*.py), and the facts config's rules need are
declared again on the method's config model (config sits below the methods and cannot ask them): the two agree."""

from __future__ import annotations

import pytest

from tunelab import advise, compare, config, methods
from tunelab.config import rules
from tunelab.config.methods import BY_NAME
from tunelab.methods import named

FAMILIES = set(advise.FAMILIES)


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_every_method_declares_every_fact(name):
    m = methods.get(name)
    for fact in ("CHANGES_BASE", "MERGEABLE", "SWITCHABLE", "QUANTIZES_BASE"):
        assert isinstance(getattr(m, fact), bool), f"{name}.{fact}"
    assert m.VIRTUAL_TOKENS in (None, "inputs", "keys")
    assert isinstance(m.DEFAULT_LR, float) and 0 < m.DEFAULT_LR < 1
    assert set(m.ACTIVATION_SHARE) == FAMILIES and all(0 <= v <= 2 for v in m.ACTIVATION_SHARE.values())
    if m.QUANTIZES_BASE:
        assert callable(m.dry_apply), f"{name} quantizes its base: advise counts it with dry_apply"


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_the_method_and_its_config_model_declare_the_same_facts(name):
    m, cfg = methods.get(name), BY_NAME[name]
    assert m.SWITCHABLE is cfg.SWITCHABLE
    assert bool(m.VIRTUAL_TOKENS) is cfg.VIRTUAL_TOKENS
    assert hasattr(m, "unfreeze_stages") is cfg.UNFREEZES  # train.unfreeze=gradual calls it only where config allows
    # multitask.adapters=per_task: one named adapter per task, which virtual-token methods cannot be
    assert (name in rules.NAMED_ADAPTER_METHODS) is (m.SWITCHABLE and not m.VIRTUAL_TOKENS)


def test_every_method_has_a_config_model_and_the_same_name():
    assert set(methods.METHODS) == set(config.METHOD_NAMES) == set(BY_NAME)


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_reserved_positions_are_the_virtual_tokens(name):
    cls = BY_NAME[name]
    kw = {"num_virtual_tokens": 7} if "num_virtual_tokens" in cls.model_fields else {}
    expected = 7 if methods.get(name).VIRTUAL_TOKENS else 0
    assert methods.reserved_positions(cls(name=name, **kw)) == expected


def test_the_derived_name_lists_are_those_the_messages_always_gave():
    """The lists the error messages print come from the declared facts, in the order they were written before."""
    assert named.SWITCHABLE == ("lora", "dora", "ia3", "adapter", "prompt", "ptuning", "prefix")
    assert rules.VIRTUAL_TOKEN_METHODS == ("prompt", "ptuning", "prefix")
    assert rules.NAMED_ADAPTER_METHODS == ("lora", "dora", "ia3", "adapter")
    assert rules.UNFREEZING_METHODS == ("freeze",)
    assert rules.PADDING_FREE_TASKS == ("sft", "causal_lm", "classification", "regression", "multilabel")
    assert rules.PACKING_TASKS == ("sft", "causal_lm")
    assert rules.PAIR_TASKS == ("classification", "regression", "multilabel")
    assert rules.STREAMING_TASKS == rules.AUGMENT_TASKS == rules.LABEL_SMOOTHING_TASKS == ("classification",)


def test_default_learning_rates():
    assert compare.DEFAULT_LR == {"full": 5e-5, "freeze": 1e-4, "lora": 1e-3, "dora": 1e-3, "qlora": 1e-3,
                                  "adapter": 1e-3, "bitfit": 1e-3, "ia3": 1e-2, "prefix": 1e-2, "ptuning": 1e-3,
                                  "prompt": 3e-2}


def test_advise_lists_every_method_once():
    assert sorted(advise.METHOD_ORDER) == sorted(methods.METHODS)
