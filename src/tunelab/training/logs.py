"""Where a run's records go: metrics.jsonl always (the report and `compare` read it), TensorBoard when asked.

Every record is one JSON line: {"type": "train" | "eval" | "optimizer" | ..., "step": ..., <numbers>}, valid JSON: a
number that is not finite (a diverged loss) is written as null. Each line is flushed to the file as it is written,
so a checkpoint's log size (Checkpoints.log_bytes, which fsyncs the file) covers every record before it.
TensorBoard gets the numeric fields of records that have a step, as `<train|split>/<name>` scalars, and each
parameter group's LR as `lr/<group>`.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from .. import atomic
from ..errors import TunelabError


def check(log_to: list[str]) -> None:
    """Fail before any work when a logger is asked for but not installed."""
    if "tensorboard" in log_to:
        try:
            import tensorboard  # noqa: F401  (torch's SummaryWriter needs it)
        except ImportError:
            raise TunelabError("train.log_to: 'tensorboard' needs the tensorboard package, which is not installed. "
                               "Install it (pip install 'tunelab[tensorboard]' or pip install tensorboard), "
                               "or remove tensorboard from train.log_to.") from None


@contextmanager
def open_log(run_dir: Path, log_to: list[str], listener=None):
    """Yield `log(record)`; `listener(record)` sees every record too (a sweep's pruner listens there)."""
    writer = None
    if "tensorboard" in log_to:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
    with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as log_file:
        def log(record: dict) -> None:
            log_file.write(json.dumps(atomic.finite(record), allow_nan=False) + "\n")
            log_file.flush()  # through to the file: a checkpoint taken next records the log's size
            if writer is not None:
                _scalars(writer, record)
            if listener is not None:
                listener(record)

        try:
            yield log
        finally:
            if writer is not None:
                writer.close()


def _scalars(writer, record: dict) -> None:
    step = record.get("step")
    if step is None:
        return
    kind = record.get("type")
    prefix = "train" if kind == "train" else record.get("split", kind)
    if record.get("task"):
        prefix = f"{prefix}/{record['task']}"
    for key, value in record.items():
        if key in ("step", "epoch") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        writer.add_scalar(f"{prefix}/{key}", value, step)
    for group, lr in (record.get("lrs") or {}).items():
        writer.add_scalar(f"lr/{group}", lr, step)
