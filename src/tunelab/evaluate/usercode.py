"""A Python function the user names in a recipe to score generated text: GRPO's `task.reward_function` and a
generative evaluation's `eval.judge`, written 'module:function' (importable) or 'path/to/file.py:function'.

Naming it in the recipe is the opt-in, and the only one: it imports and runs the user's code (docs/safety.md), so
nothing else in tunelab calls this. `load` finds the function; `numbers` calls it and checks what came back, so a
function that raises or returns the wrong thing is one paragraph naming the key and the fix, not a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import TunelabError


def parts(spec: str) -> tuple[str, str] | None:
    """(module or .py file, function name) of 'module:function' / 'file.py:function', or None when `spec` is not
    written so."""
    module_name, _, name = spec.rpartition(":")
    return (module_name, name) if module_name and name else None


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
            file_spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if file_spec is None or not Path(module_name).is_file():
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
