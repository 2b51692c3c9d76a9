"""Every task module provides every name of `tasks.Task`, functions with the Protocol's parameters, flags of the
declared kinds: the loop, the pipeline, predict and the CLI call these without probing which task they hold."""

from __future__ import annotations

import inspect
import typing

import pytest

from tunelab import tasks

FLAG_VALUES = {"BASE": (True, False), "PACKS": (True, False), "ROWS_INTERACT": (True, False),
               "FORGETTING": ("perplexity", "linear_probe"), "PROBE": (True, False, "ridge", "multilabel"),
               "GENERATES": (True, False), "EMBEDS": (True, False), "SCORES_REPLIES": (True, False),
               "PIPELINE_TAG": ("text-classification", "token-classification", "question-answering", "text-generation",
                                "fill-mask", "feature-extraction", "sentence-similarity")}


def _protocol_functions() -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in vars(tasks.Task).items()
            if inspect.isfunction(fn) and not name.startswith("_")}


def _parameters(signature: inspect.Signature) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in signature.parameters.values() if p.name != "self"]


MODULES = sorted({module.__name__: module for module in tasks.TASKS.values()}.items())


def test_the_protocol_names_flags_and_functions():
    assert {"loss", "collate", "metrics", "prepare", "finish"} <= set(_protocol_functions())
    assert {"BASE", "PACKS", "ROWS_INTERACT", "FORGETTING"} <= set(typing.get_type_hints(tasks.Task))


@pytest.mark.parametrize("name,module", MODULES, ids=[n for n, _ in MODULES])
def test_every_task_has_every_name_with_the_protocols_signature(name, module):
    for flag in typing.get_type_hints(tasks.Task):
        assert hasattr(module, flag), f"{name} does not declare {flag}"
        if flag in FLAG_VALUES:
            assert getattr(module, flag) in FLAG_VALUES[flag], f"{name}.{flag} = {getattr(module, flag)!r}"
    for fn_name, wanted in _protocol_functions().items():
        fn = getattr(module, fn_name, None)
        assert callable(fn), f"{name} has no {fn_name}()"
        assert _parameters(inspect.signature(fn)) == _parameters(wanted), \
            f"{name}.{fn_name}{inspect.signature(fn)} differs from Task.{fn_name}{wanted}"


def test_a_task_missing_a_name_or_with_another_loss_signature_is_caught():
    """The check above on a planted module: a loss without `info`, and no `finish`."""
    import types

    fake = types.ModuleType("fake")
    for attr in dir(tasks.classification):
        setattr(fake, attr, getattr(tasks.classification, attr))
    fake.loss = lambda model, batch: None
    with pytest.raises(AssertionError, match="loss"):
        test_every_task_has_every_name_with_the_protocols_signature("fake", fake)
    fake.loss = tasks.classification.loss
    del fake.finish
    with pytest.raises(AssertionError, match="finish"):
        test_every_task_has_every_name_with_the_protocols_signature("fake", fake)


def test_packs_agrees_with_pack_and_the_task_config():
    """PACKS is what config's rules allow for packing and padding-free, and only packing tasks write pack()."""
    from tunelab.config import rules

    for type_, module in tasks.TASKS.items():
        if type_ == "grpo":  # online RL has its own loop: nothing is packed there
            continue
        assert module.PACKS == (type_ in rules.PADDING_FREE_TASKS), type_
        assert (module.pack is tasks.base.pack) == (not module.PACKS), type_


def test_generates_and_embeds_agree_with_their_functions():
    """GENERATES / EMBEDS are what predict.TunedModel checks before generate / embed: a task declaring one writes
    the functions behind it, and a task declaring neither keeps base.py's (which refuse)."""
    for type_, module in tasks.TASKS.items():
        for flag, names in (("GENERATES", ("generate", "generation_prompt")), ("EMBEDS", ("embed_texts", "search"))):
            for fn in names:
                assert (getattr(module, fn) is getattr(tasks.base, fn)) == (not getattr(module, flag)), (type_, fn)


@pytest.mark.parametrize("type_,words", [("sft", "which writes text: use generate"), ("dpo", "which writes text"),
                                         ("mlm", "it labels nothing"), ("embedding", "use embed or search")])
def test_a_task_that_labels_nothing_says_what_to_use_instead(type_, words):
    """predict on a run that writes text, adapts a domain or embeds: the task's own message, naming the run."""
    import types

    from tunelab.errors import TunelabError

    cfg = types.SimpleNamespace(task=types.SimpleNamespace(type=type_))
    with pytest.raises(TunelabError, match=words) as e:
        tasks.get(type_).predict(["a text"], None, None, {}, cfg, 16, None, "runs/x")
    assert "'runs/x'" in str(e.value)

