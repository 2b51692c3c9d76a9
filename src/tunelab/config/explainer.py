"""`tunelab config explain`: every key with its default and description, the keys of each task and each method
under the type or name that allows them. `keys()` gives the same entries as data (the web UI's form is built from
them); `explain()` prints them."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from .methods import METHOD_CONFIGS
from .schema import Config, TaskSpec
from .tasks import TASK_CONFIGS, TaskConfig

UNION_SECTIONS = {"task": ("type", TASK_CONFIGS), "method": ("name", METHOD_CONFIGS)}


@dataclass(frozen=True)
class Key:
    """One line of `tunelab config explain`.

    key: the dotted key ('train.lr', 'method.r', 'tasks[].name'); label: as the line shows it ('method.r (lora)',
    'task.type = sft'); field: its pydantic field (None for the line about tasks[]'s sections); default: as the line
    shows it ('required', a repr, '' on a choice's line); when: (the choosing key, its value) for a key that only
    one task type or method has, and for the line that describes that choice itself (choice=True)."""

    key: str
    label: str
    field: FieldInfo | None
    default: str
    description: str | None
    when: tuple[str, str] | None = None
    choice: bool = False


def _line(label: str, default: str, description: str | None) -> str:
    return f"{label:34} {default:16} {description or ''}"


def _default(field) -> str:
    return "required" if field.is_required() else repr(field.get_default(call_default_factory=True))


def _section(ann) -> type[BaseModel] | None:
    """The section model of a field annotated `Section` or `Section | None`; None for plain values."""
    for a in (ann, *getattr(ann, "__args__", ())):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _union(section: str, choice: str, models) -> list[Key]:
    """Each model's `<section>.<choice> = <value>` line, then its own keys as `<section>.<key> (<value>)`."""
    keys = []
    for m in models:
        value = m.model_fields[choice].annotation.__args__[0]
        when = (f"{section}.{choice}", value)
        for name, field in m.model_fields.items():
            if name == choice:
                keys.append(Key(f"{section}.{name}", f"{section}.{name} = {value}", field, "", field.description,
                                when, choice=True))
            else:
                keys.append(Key(f"{section}.{name}", f"{section}.{name} ({value})", field, _default(field),
                                field.description, when))
    return keys


def keys() -> list[Key]:
    """Every key of a recipe, in the order `tunelab config explain` lists them."""
    out: list[Key] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            if name == "task":
                field = TaskConfig.model_fields["type"]
                out.append(Key("task.type", "task.type", field, repr(field.default), field.description))
                out.extend(_union("task", *UNION_SECTIONS["task"]))
            elif name == "method":
                continue  # listed per method at the end
            elif _section(field.annotation) is not None and name != "tasks":
                walk(_section(field.annotation), key + ".")
            else:
                out.append(Key(key, key, field, _default(field), field.description))

    walk(Config, "")
    for name in ("name", "weight"):
        field = TaskSpec.model_fields[name]
        out.append(Key(f"tasks[].{name}", f"tasks[].{name}", field, _default(field), field.description))
    out.append(Key("tasks[].task", "tasks[].task, tasks[].data", None, "",
                   "The task and data sections above, per task."))
    out.extend(_union("method", *UNION_SECTIONS["method"]))
    return out


def explain() -> str:
    """Every key with its default and description."""
    return "\n".join(_line(k.label, k.default, k.description) for k in keys())
