"""`tunelab config explain`: every key with its default and description, the keys of each task and each method
under the type or name that allows them."""

from __future__ import annotations

from pydantic import BaseModel

from .methods import METHOD_CONFIGS
from .schema import Config, TaskSpec
from .tasks import TASK_CONFIGS, TaskConfig

UNION_SECTIONS = {"task": ("type", TASK_CONFIGS), "method": ("name", METHOD_CONFIGS)}


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


def _union(section: str, choice: str, models) -> list[str]:
    """Each model's `<section>.<choice> = <value>` line, then its own keys as `<section>.<key> (<value>)`."""
    lines = []
    for m in models:
        value = m.model_fields[choice].annotation.__args__[0]
        for name, field in m.model_fields.items():
            if name == choice:
                lines.append(_line(f"{section}.{name} = {value}", "", field.description))
            else:
                lines.append(_line(f"{section}.{name} ({value})", _default(field), field.description))
    return lines


def explain() -> str:
    """Every key with its default and description."""
    lines = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            if name == "task":
                field = TaskConfig.model_fields["type"]
                lines.append(_line("task.type", repr(field.default), field.description))
                lines.extend(_union("task", *UNION_SECTIONS["task"]))
            elif name == "method":
                continue  # listed per method at the end
            elif _section(field.annotation) is not None and name != "tasks":
                walk(_section(field.annotation), key + ".")
            else:
                lines.append(_line(key, _default(field), field.description))

    walk(Config, "")
    for name in ("name", "weight"):
        field = TaskSpec.model_fields[name]
        lines.append(_line(f"tasks[].{name}", _default(field), field.description))
    lines.append(_line("tasks[].task, tasks[].data", "", "The task and data sections above, per task."))
    lines.extend(_union("method", *UNION_SECTIONS["method"]))
    return "\n".join(lines)
