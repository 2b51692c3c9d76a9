"""A Python function the user names to score generated text: GRPO's `task.reward_function` and a generative
evaluation's judge (`eval.judge`, `tunelab eval --generate --judge`), written 'module:function' (importable) or
'path/to/file.py:function'.

Naming it in a recipe or on the command line is the opt-in, and the only one: it imports and runs the user's code
(docs/safety.md), so nothing else in tunelab calls this, and a run folder's own config.yaml is not such a naming
(--resume leaves a function judge out). `load` finds the function; `numbers` calls it and checks what came back, so a
function that raises or returns the wrong thing is one paragraph naming the key and the fix, not a traceback;
`judge` is eval.judge's either kind (a reward run or a function) as one scorer.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import TunelabError


def parts(spec: str) -> tuple[str, str] | None:
    """(module or .py file, function name) of 'module:function' / 'file.py:function', or None when `spec` is not
    written so."""
    module_name, _, name = spec.rpartition(":")
    return (module_name, name) if module_name and name else None


def source_file(spec: str) -> str | None:
    """The .py file of 'file.py:function' as written, or None ('module:function' is found by import)."""
    found = parts(spec)
    return found[0] if found and found[0].endswith(".py") else None


def is_run(spec: str) -> bool:
    """A judge given as an existing directory is a reward-model run, not code (see `judge`)."""
    return Path(os.path.expanduser(spec)).is_dir()


def load(spec: str, key: str, called_as: str) -> Callable:
    """The function `spec` names, as the user wrote it (its calls go through `numbers`). `key` is the setting that
    named it (task.reward_function, eval.judge); `called_as` ends the message for a name that is not a function,
    e.g. "function(prompts, completions) that returns one number per completion"."""
    found = parts(spec)
    if found is None:
        raise TunelabError(f"{key}={spec!r}: expected 'module:function' or 'file.py:function'.")
    module_name, name = found
    try:
        if module_name.endswith(".py"):
            file = os.path.expanduser(module_name)
            file_spec = importlib.util.spec_from_file_location(Path(file).stem, file)
            if file_spec is None or not Path(file).is_file():
                raise FileNotFoundError(module_name)
            module = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        fn = getattr(module, name)
    except Exception as e:  # noqa: BLE001 - ImportError, a missing file or name, or the module's own code failing
        raise TunelabError(f"{key}={spec!r} could not be loaded ({type(e).__name__}{_detail(e)}). Give an importable "
                           f"module or an existing .py file that imports without errors, and a function defined "
                           f"in it.") from None
    if not callable(fn):
        raise TunelabError(f"{key}={spec!r}: '{name}' is {fn!r:.40}, not a function. Name a {called_as}.")
    return fn


def judge(spec: str, key: str, reward_scorer: Callable) -> Callable[[list[dict], list[str], str], list[float]]:
    """A judge (eval.judge, or --judge of `tunelab eval --generate`) as a function (prompt rows of generation_rows,
    replies, whose replies they are) -> one score per reply. A directory is a tunelab reward-model run, loaded by
    `reward_scorer` (predict.reward_scorer: loading a run is the layer above's) for each call only, so it holds no
    memory while a run trains; otherwise 'module:function' or 'file.py:function', the user's own code, imported now
    and called as function(prompts, replies, references): the prompts unrendered, as a reward model reads them (chat
    messages; causal_lm: the text's opening words)."""
    if is_run(spec):
        def scored_by_run(rows: list[dict], replies: list[str], whose: str) -> list[float]:
            score = reward_scorer(spec, key, f"; give a reward run's directory or a Python 'module:function', or "
                                             f"remove {key}")
            return score([r["messages"] for r in rows], replies)
        return scored_by_run
    if parts(spec) is None:
        raise TunelabError(f"{key}={spec!r} is neither an existing directory nor a Python function: give the run "
                           f"directory of a tunelab reward model (task.type reward), or a function as "
                           f"'module:function' or 'path/to/file.py:function' (it runs your code: see docs/safety.md), "
                           f"or remove {key}.")
    fn = load(spec, key, "function(prompts, replies, references) that returns one number per reply")

    def scored_by_function(rows: list[dict], replies: list[str], whose: str) -> list[float]:
        # a copy: the rows' own messages are written out later, whatever the function does to its arguments
        prompts, references = copy.deepcopy([r["messages"] for r in rows]), [r["reference"] for r in rows]
        fix = (f"The judge is called as function(prompts, replies, references) with three lists of {len(replies)} "
               f"(the prompts as chat messages, or texts for causal_lm; the replies and the reference replies as "
               f"strings) and must return {len(replies)} finite numbers, one per reply (a reply may be empty); "
               f"fix it.")
        shown = [p[-1].get("content", "") if isinstance(p, list) and p and isinstance(p[-1], dict) else p
                 for p in prompts]  # a conversation is shown by its last message
        return numbers(lambda: fn(prompts, list(replies), references), shown, replies, f"The judge {key}={spec!r}",
                       f"when judging {whose}", fix, ("reply", "replies"))
    return scored_by_function


def numbers(call: Callable[[], object], prompts: list, texts: list[str], who: str, when: str, fix: str,
            unit: tuple[str, str] = ("completion", "completions")) -> list[float]:
    """What `call()` returns, as one float per text, or a one-paragraph TunelabError saying what went wrong: the
    function raised, returned the wrong number of values, or a value that is not a finite number. `who` opens the
    message ("The reward task.reward_function='rewards.py:score'"), `when` says what it was scoring, `fix` ends it;
    `unit` names one text and several (completion(s), reply/replies); `prompts[i]`, shown by its end, is what
    `texts[i]` answered."""
    got = None
    try:
        got = call()
        values = list(got) if isinstance(got, Iterable) and not isinstance(got, (str, bytes, dict)) else None
    except TunelabError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's function: any failure is theirs to fix, in one paragraph
        raise TunelabError(f"{who} raised {type(e).__name__}{_detail(e)} {when}. {fix}") from None
    if values is None:
        raise TunelabError(f"{who} returned {_short(got)} ({type(got).__name__}), not a list of numbers, {when}. {fix}")
    if len(values) != len(texts):
        raise TunelabError(f"{who} returned {len(values)} value(s) for {len(texts)} {unit[1]} {when}. {fix}")
    out = []
    for i, v in enumerate(values):
        try:
            number = None if isinstance(v, (str, bytes)) or v is None else float(v)
        except (TypeError, ValueError, OverflowError):
            number = None
        if number is None or not math.isfinite(number):
            prompt = " ".join(str(prompts[i]).split())[-80:]  # the end of the prompt: where the question is
            raise TunelabError(
                f"{who} returned {_short(v)} ({type(v).__name__}) for {unit[0]} {i + 1} of {len(texts)} {when} "
                f"({unit[0]} {texts[i]!r:.60} to the prompt ending {prompt!r}), which is not a finite number. {fix}")
        out.append(number)
    return out


def _detail(e: Exception) -> str:
    """': ' and the first line of an exception's message (at most 200 characters), or nothing when it has none."""
    text = str(e).strip()
    return f": {text.splitlines()[0][:200]}" if text else ""


def _short(value) -> str:
    return " ".join(repr(value).split())[:60]  # on one line, whatever the object's repr
