"""The library versions a run was made with (versions.json in the run directory), and a warning when a run is
resumed or loaded under others: a new transformers can change a model's numbers or refuse its options."""

from __future__ import annotations

import importlib.metadata as md
import json
import platform
from pathlib import Path

PACKAGES = ("tunelab", "torch", "transformers", "peft", "safetensors")


def current() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found


def check(run_dir: Path, doing: str, say=print) -> list[str]:
    """Warn (and return) each package whose version differs from the one `run_dir` was made with."""
    path = Path(run_dir) / "versions.json"
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []  # a run made before versions were recorded, or a plain model directory
    now = current()
    changed = [f"{name} {recorded[name]} -> {now.get(name)}" for name in PACKAGES
               if name in recorded and recorded[name] != now.get(name)]
    if changed:
        say(f"warning: {doing} {run_dir}, made with other library versions: {', '.join(changed)}. Results may differ "
            f"slightly from the original run's; install the recorded versions (versions.json) to reproduce it exactly.")
    return changed
