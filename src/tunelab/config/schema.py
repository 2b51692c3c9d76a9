"""The whole recipe: the sections put together, for one task (`data` + `task`) or several (`tasks`)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from .methods import FullConfig, MethodConfig
from .sections import DataConfig, EvalConfig, ModelConfig, MultitaskConfig, Section, TrainConfig
from .tasks import ClassificationConfig, TaskSection


class TaskSpec(Section):
    """One task of a multi-task run: its own data, head and loss weight; the body is shared."""

    name: str = Field(description="Task name: used in metrics (<name>/<metric>), the run directory and `--task`.")
    weight: float = Field(1.0, gt=0, description="Loss weight alpha_t: each step's loss is the sum of alpha_t * L_t.")

    @field_validator("name")
    @classmethod
    def _a_plain_name(cls, v: str) -> str:
        # it names files and folders of the run directory (heads/<name>.safetensors): nothing may lead outside it
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", v) or ".." in v:
            raise ValueError("use letters, digits, '_', '-' and '.' only (no '/', no '..'), starting with a letter "
                             "or digit, at most 64 characters")
        return v
    task: TaskSection = Field(default_factory=ClassificationConfig)
    data: DataConfig


class Config(Section):
    model: ModelConfig
    data: DataConfig | None = Field(None, description="The data of a single-task run (required unless `tasks` is given).")
    tasks: list[TaskSpec] | None = Field(None, description="Multi-task: a list of {name, weight, task, data}; replaces data and task.")
    multitask: MultitaskConfig = Field(default_factory=MultitaskConfig)
    task: TaskSection = Field(default_factory=ClassificationConfig)
    method: MethodConfig = Field(default_factory=lambda: FullConfig(name="full"))
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output_dir: str | None = Field(None, description="Run directory; default runs/<recipe>-<time>. Never overwritten without --overwrite.")
