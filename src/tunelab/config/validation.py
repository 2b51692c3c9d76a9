"""Validation of a config tree, and what a user reads when it fails: every bad key at once, named by its dotted
path, an unknown key with a did-you-mean (and, for a key of another task or method, which one it belongs to)."""

from __future__ import annotations

import difflib
import reprlib

from pydantic import ValidationError

from ..errors import TunelabError
from .methods import METHOD_CONFIGS, METHOD_NAMES
from .rules import check_single, check_tasks, words
from .schema import Config, TaskSpec
from .sections import DataConfig, EvalConfig, ModelConfig, MultitaskConfig, TrainConfig
from .tasks import BY_TYPE, DEFAULT_TYPE, TASK_TYPES

# The sections whose keys do not depend on the rest of the tree, by the name they are given under.
SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig,
            "multitask": MultitaskConfig}
# The unions: section name -> (the key that chooses the model, its model per value).
UNIONS = {"method": ("name", {m.model_fields["name"].annotation.__args__[0]: m for m in METHOD_CONFIGS}),
          "task": ("type", BY_TYPE)}

# Names recipes copied from Hugging Face / peft scripts use, which spelling similarity would match to the wrong key
# (learning_rate is closer to padding_free than to lr).
ALIASES = {"learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs", "per_device_train_batch_size":
           "batch_size", "train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
           "model_name_or_path": "path", "max_seq_length": "max_length", "lora_r": "r", "lora_alpha": "alpha",
           "lora_dropout": "dropout"}
_short_repr = reprlib.Repr()
_short_repr.maxlevel, _short_repr.maxstring, _short_repr.maxother, _short_repr.maxlist, _short_repr.maxdict = 2, 60, 60, 4, 4


def validate(tree: dict, source: str = "config") -> Config:
    """A config tree (parsed YAML with overrides applied) as a `Config`, every section and every rule between
    sections checked; a `TunelabError` naming each bad key otherwise."""
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as e:
        raise TunelabError(explain_errors(e, tree, source)) from None
    if cfg.tasks is not None:
        return check_tasks(cfg, source)
    if cfg.data is None:
        raise TunelabError(f"Invalid config in {source}: 'data' is required (data.train names the training file), "
                           f"or give a `tasks:` list for a multi-task run.")
    return check_single(cfg, source)


def _node(tree, path: list[str]):
    """What `tree` holds at `path` (dict keys and list indices), or None."""
    for part in path:
        if isinstance(tree, dict):
            tree = tree.get(part)
        elif isinstance(tree, list) and part.isdigit() and int(part) < len(tree):
            tree = tree[int(part)]
        else:
            return None
    return tree


def _chosen(union: str, node) -> str | None:
    """The method name / task type a union section asks for; None when it names none that exists."""
    key, models = UNIONS[union]
    value = node.get(key, DEFAULT_TYPE if union == "task" else None) if isinstance(node, dict) else None
    return value if isinstance(value, str) and value in models else None


def section_keys(tree: dict, section: list[str]) -> list[str]:
    """The keys allowed in the section at `section` (e.g. ['tasks', '0', 'task']): a method's or task's keys depend
    on the name or type it gives (all of them when it gives none that exists)."""
    if not section:
        return list(Config.model_fields)
    last = section[-1]
    if last.isdigit() and section[:-1] == ["tasks"]:
        return list(TaskSpec.model_fields)
    if last in UNIONS:
        models = UNIONS[last][1]
        chosen = _chosen(last, _node(tree, section))
        if chosen is not None:
            fields = list(models[chosen].model_fields)
            return sorted(fields) if last == "method" else fields
        return sorted({f for m in models.values() for f in m.model_fields})
    return list(SECTIONS[last].model_fields) if last in SECTIONS else []


def _owners(tree: dict, section: list[str], key: str) -> str:
    """For a key of another task or method: ' (a key of task.type multilabel, not classification)'; else ''."""
    if not section or section[-1] not in UNIONS:
        return ""
    union = section[-1]
    choice, models = UNIONS[union]
    owners = tuple(name for name, m in models.items() if key in m.model_fields)
    if not owners:
        return ""
    current = _chosen(union, _node(tree, section))
    return f"a key of {union}.{choice} {words(owners)}" + (f", not {current}" if current else "")


def _strip(loc: list[str]) -> list[str]:
    """Field names only: pydantic puts in the union member chosen (method.lora.r, task.qa.n_best) and the type
    names of a value's union (e.g. 'int', "literal['all']"). Never the first: a top-level key named `lora:` or
    `str:` is the user's own mistake to report."""
    out = loc[:1]
    for prev, part in zip(loc, loc[1:]):
        member = prev in UNIONS and part in UNIONS[prev][1]
        if not (member or part in ("int", "str", "float", "list[str]") or part.startswith("literal[")):
            out.append(part)
    return [x if x.isprintable() else repr(x)[1:-1] for x in out]  # a key with a newline would split the message


def explain_errors(e: ValidationError, tree: dict, source: str) -> str:
    """One message for all of a validation's errors, each naming its dotted key."""
    return paragraph([msg for _, msg in error_messages(e, tree)], source)


def paragraph(msgs: list[str], source: str) -> str:
    """The message a user reads for these errors (each naming its key), given once each."""
    unique = list(dict.fromkeys(msgs))
    return f"Invalid config in {source}: " + "; ".join(unique) + " — fix these keys in the YAML file or override them as key=value (`tunelab config explain` lists every key)."


def error_messages(e: ValidationError, tree: dict) -> list[tuple[str, str]]:
    """(dotted key, what is wrong with it) for each of a validation's errors (the key of a bad union choice is its
    `task.type` / `method.name`)."""
    msgs = []
    for err in e.errors():
        loc = _strip([str(x) for x in err["loc"]])
        key = ".".join(loc)
        if err["type"] == "extra_forbidden":
            section = loc[:-1]
            prefix = ".".join(section) + "." if section else ""
            allowed = section_keys(tree, section)
            alias = ALIASES.get(loc[-1])
            owners = _owners(tree, section, loc[-1])
            # A key of another task or method is most likely meant for it: no look-alike of this one's keys then.
            close = [alias] if alias in allowed else [] if owners else \
                difflib.get_close_matches(loc[-1], allowed, n=1, cutoff=0.5)
            if close:
                hint = f"did you mean '{prefix}{close[0]}'?" + (f" ('{loc[-1]}' is {owners})" if owners else "")
            else:
                hint = (f"it is {owners}; " if owners else "") + f"valid keys here: {', '.join(allowed)}"
            msgs.append((key, f"unknown key '{key}' — {hint}"))
        elif err["type"] == "missing":
            msgs.append((key, f"'{key}' is required"))
        elif err["type"] in ("union_tag_invalid", "union_tag_not_found") and loc[-1:] == ["task"]:
            given = err.get("input")
            if isinstance(given, dict):
                value = _short_repr.repr(given.get("type"))
                msgs.append((f"{key}.type", f"'{key}.type' = {value}: Input should be "
                                            f"{words(tuple(map(repr, TASK_TYPES)), 'or')}"))
            else:
                msgs.append((key, f"'{key}' = {_short_repr.repr(given)}: Input should be a mapping (task.type and "
                                  f"that task's keys)"))
        elif err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            msgs.append((f"{key or 'method'}.name", f"'{key or 'method'}.name' must be one of {', '.join(METHOD_NAMES)}"))
        else:
            value = _short_repr.repr(err.get("input"))  # a value may be a whole (even self-referencing) YAML tree
            msgs.append((key, f"'{key}' = {value}: {err['msg']}"))
    return msgs
