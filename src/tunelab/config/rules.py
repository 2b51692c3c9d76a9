"""Rules that span sections (a data key that only some tasks read, a train key that needs some method, ...), checked
once every section is valid on its own.

The facts these rules need about methods and tasks (which methods prepend virtual tokens, which tasks pack, ...)
belong to the method and task modules, but config sits below them (layer 1) and cannot ask them. Each method's and
task's own config model therefore declares them beside its keys (methods.py, tasks.py: e.g. PromptConfig's
VIRTUAL_TOKENS), and the rules read them from the section in hand; no rule names a method or task itself. The names
the messages list are derived from those facts below. A task's rules about its own keys are its model's `problems()`
(tasks.py).
"""

from __future__ import annotations

from ..errors import TunelabError
from .methods import BY_NAME
from .schema import Config
from .tasks import BY_TYPE

# -- the methods and tasks each fact holds for, in the order of the method and task unions (for messages) -----------
VIRTUAL_TOKEN_METHODS = tuple(n for n, c in BY_NAME.items() if c.VIRTUAL_TOKENS)
# multitask.adapters=per_task: one named adapter per task on a shared base (virtual tokens hook one task's model)
NAMED_ADAPTER_METHODS = tuple(n for n, c in BY_NAME.items() if c.SWITCHABLE and not c.VIRTUAL_TOKENS)
UNFREEZING_METHODS = tuple(n for n, c in BY_NAME.items() if c.UNFREEZES)
# (its message has always named the tasks that also take data.packing first)
PADDING_FREE_TASKS = tuple(sorted((t for t, c in BY_TYPE.items() if c.PADDING_FREE), key=lambda t: not BY_TYPE[t].PACKING))
PACKING_TASKS = tuple(t for t, c in BY_TYPE.items() if c.PACKING)
PAIR_TASKS = tuple(t for t, c in BY_TYPE.items() if c.TEXT_PAIRS)
STREAMING_TASKS = tuple(t for t, c in BY_TYPE.items() if c.STREAMING)
AUGMENT_TASKS = tuple(t for t, c in BY_TYPE.items() if c.AUGMENT)
LABEL_SMOOTHING_TASKS = tuple(t for t, c in BY_TYPE.items() if c.LABEL_SMOOTHING)
GENERATIVE_EVAL_TASKS = tuple(t for t, c in BY_TYPE.items() if c.GENERATIVE_EVAL)


def words(names: tuple[str, ...], last: str = "and") -> str:
    """('a', 'b', 'c') -> 'a, b and c'."""
    return f" {last} ".join(filter(None, (", ".join(names[:-1]), names[-1])))


def single(cfg: Config, name: str) -> Config:
    """The config of one task of a multi-task run, as a single-task config (its data and task sections)."""
    spec = next(t for t in cfg.tasks if t.name == name)
    return cfg.model_copy(update={"data": spec.data, "task": spec.task, "tasks": None})


def check_tasks(cfg: Config, source: str) -> Config:
    """A multi-task config: the list, the method, and every task as a single-task config."""
    if cfg.data is not None:
        raise TunelabError(f"Invalid config in {source}: give either `data` (one task) or `tasks` (several, each with "
                           f"its own data), not both; move the data section into a task of the list.")
    if not cfg.tasks:
        raise TunelabError(f"Invalid config in {source}: `tasks` is empty; list at least one {{name, task, data}}.")
    names = [t.name for t in cfg.tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TunelabError(f"Invalid config in {source}: task names must be unique, {', '.join(map(repr, dupes))} "
                           f"appears more than once in `tasks`; rename one.")
    bad = [n for n in names if not n or "/" in n or n != n.strip()]
    if bad:
        raise TunelabError(f"Invalid config in {source}: task name {bad[0]!r} must be non-empty, without '/' or "
                           f"surrounding spaces.")
    if cfg.method.VIRTUAL_TOKENS:
        raise TunelabError(f"Invalid config in {source}: method.name={cfg.method.name} is not supported for multi-task "
                           f"runs (its virtual tokens hook one task's model); use {', '.join(NAMED_ADAPTER_METHODS)} "
                           f"or full.")
    if cfg.eval.forgetting not in (None, "auto", "none"):
        raise TunelabError(f"Invalid config in {source}: eval.forgetting is not measured in multi-task runs yet; remove "
                           f"it (each task's own validation metrics show what the shared body keeps).")
    if cfg.eval.generate:
        raise TunelabError(f"Invalid config in {source}: eval.generate is not measured in multi-task runs yet; remove "
                           f"it (score a task's replies afterwards with `tunelab eval RUN FILE --generate`).")
    if cfg.multitask.adapters == "per_task" and not cfg.method.SWITCHABLE:  # (virtual-token methods failed above)
        raise TunelabError(f"Invalid config in {source}: multitask.adapters=per_task needs an adapter method "
                           f"({', '.join(NAMED_ADAPTER_METHODS)}), not method.name={cfg.method.name}.")
    for spec in cfg.tasks:
        if spec.data.streaming:
            raise TunelabError(f"Invalid config in {source}: data.streaming=true is not supported in multi-task runs "
                               f"yet (task {spec.name!r}); set it to false there.")
        check_single(single(cfg, spec.name), f"{source} (task {spec.name!r})")
    return cfg


def check_single(cfg: Config, source: str) -> Config:
    """A single-task config: the rules between its data, task, method and train sections. Settles
    train.padding_free=auto to False where it cannot apply."""
    task, method = cfg.task.type, cfg.method.name
    virtual = cfg.method.VIRTUAL_TOKENS
    if cfg.data.augment_copies and not cfg.task.AUGMENT:
        raise TunelabError(f"Invalid config in {source}: data.augment_copies applies to task.type {words(AUGMENT_TASKS)} "
                           f"(word-level edits would break {task} labels); remove it.")
    if cfg.train.label_smoothing and not cfg.task.LABEL_SMOOTHING:
        raise TunelabError(f"Invalid config in {source}: train.label_smoothing applies to task.type "
                           f"{words(LABEL_SMOOTHING_TASKS)}, not {task}; remove it.")
    if cfg.train.unfreeze == "gradual" and not cfg.method.UNFREEZES:
        raise TunelabError(f"Invalid config in {source}: train.unfreeze=gradual unfreezes the blocks that "
                           f"method.name=freeze froze; set method.name=freeze (with method.freeze_layers), or "
                           f"train.unfreeze=none.")
    if cfg.eval.generate and not cfg.task.GENERATIVE_EVAL:
        raise TunelabError(f"Invalid config in {source}: eval.generate={cfg.eval.generate} scores generated replies "
                           f"against reference replies, which applies to task.type "
                           f"{words(GENERATIVE_EVAL_TASKS, 'or')}; a {task} run writes no replies. Remove "
                           f"eval.generate (or set it to 0).")
    if cfg.eval.judge and not cfg.eval.generate:
        raise TunelabError(f"Invalid config in {source}: eval.judge={cfg.eval.judge!r} scores generated replies, but "
                           f"eval.generate is 0; set eval.generate to the number of held-out rows to answer.")
    for problem in cfg.task.problems():
        raise TunelabError(f"Invalid config in {source}: {problem}")
    if cfg.data.text_pair_field and not cfg.task.TEXT_PAIRS:
        raise TunelabError(f"Invalid config in {source}: data.text_pair_field applies to task.type {words(PAIR_TASKS)}, "
                           f"not {task}; remove it.")
    if cfg.data.streaming and cfg.data.text_pair_field:
        raise TunelabError(f"Invalid config in {source}: data.streaming=true reads single texts; with "
                           f"data.text_pair_field set data.streaming=false.")
    if cfg.data.streaming and not cfg.task.STREAMING:
        raise TunelabError(f"Invalid config in {source}: data.streaming=true is supported for task.type "
                           f"{words(STREAMING_TASKS)}, not {task} yet; set data.streaming=false (the data is then read "
                           f"into memory).")
    if cfg.data.streaming and cfg.data.augment_copies:
        raise TunelabError(f"Invalid config in {source}: data.augment_copies keeps the altered copies in memory, which "
                           f"data.streaming=true exists to avoid; remove one of them.")
    if cfg.data.packing and not cfg.task.PACKING:
        raise TunelabError(f"Invalid config in {source}: data.packing=true applies to task.type {words(PACKING_TASKS)}, "
                           f"not {task}; remove it (classification batches are padded per batch).")
    if cfg.train.padding_free == "auto":  # on where it applies; the loop then checks the model keeps examples apart
        cfg.train.padding_free = "auto" if cfg.task.PADDING_FREE and not cfg.data.packing and not virtual else False
    if cfg.train.padding_free is True and not cfg.task.PADDING_FREE:
        raise TunelabError(f"Invalid config in {source}: train.padding_free=true applies to task.type "
                           f"{', '.join(PADDING_FREE_TASKS)}, "
                           f"not {task}; remove it (train.group_by_length=true cuts padding for any task).")
    if cfg.train.padding_free is True and cfg.data.packing:
        raise TunelabError(f"Invalid config in {source}: train.padding_free=true and data.packing=true both pack "
                           f"examples; keep one (padding_free keeps each step's examples as they are).")
    if cfg.train.padding_free is True and virtual:
        raise TunelabError(f"Invalid config in {source}: train.padding_free=true cannot be combined with method.name="
                           f"{method}: its virtual tokens are prepended once per row, so the examples after the "
                           f"first would not see them. Set train.padding_free=false.")
    if cfg.data.packing and virtual:
        raise TunelabError(f"Invalid config in {source}: data.packing=true cannot be combined with method.name="
                           f"{method}: its virtual tokens are prepended once per row, so packed examples after "
                           f"the first would not see them. Set data.packing=false (and train.group_by_length=true).")
    return cfg
