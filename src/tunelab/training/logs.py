"""Where a run's records go: metrics.jsonl always (the report and `compare` read it); TensorBoard, MLflow and
Weights & Biases when `train.log_to` asks (tracking.py has the trackers).

Every record is one JSON line: {"type": "train" | "eval" | "optimizer" | ..., "step": ..., <numbers>}, valid JSON: a
number that is not finite (a diverged loss) is written as null. Each line is flushed to the file as it is written,
so a checkpoint's log size (Checkpoints.log_bytes, which fsyncs the file) covers every record before it.
TensorBoard, MLflow and W&B get the numeric fields of records that have a step, under one set of names
(tracking.scalars): `<train|split>/<name>`, and each parameter group's LR as `lr/<group>`. Only the first process
of a multi-process run writes to them. A tracker that fails is dropped with a warning; metrics.jsonl never is.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from .. import atomic
from ..errors import TunelabError
from . import distributed, tracking


def check(log_to: list[str]) -> None:
    """Fail before any work when a logger is asked for but not installed."""
    if "tensorboard" in log_to:
        try:
            import tensorboard  # noqa: F401  (torch's SummaryWriter needs it)
        except ImportError:
            raise TunelabError("train.log_to: 'tensorboard' needs the tensorboard package, which is not installed. "
                               "Install it (pip install 'tunelab[tensorboard]' or pip install tensorboard), "
                               "or remove tensorboard from train.log_to.") from None
    tracking.check(log_to)


@contextmanager
def open_log(run_dir: Path, cfg, listener=None):
    """Yield `log(record)` for a run with config `cfg`; `listener(record)` sees every record too (a sweep's pruner
    listens there). MLflow and W&B runs stay open when training ends well: `finish` gives them the finished run."""
    log_to = cfg.train.log_to
    writer = None
    if "tensorboard" in log_to:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
    trackers = tracking.start(run_dir, cfg) if distributed.is_main() else None
    with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as log_file:
        def log(record: dict) -> None:
            log_file.write(json.dumps(atomic.finite(record), allow_nan=False) + "\n")
            log_file.flush()  # through to the file: a checkpoint taken next records the log's size
            named, step = tracking.scalars(record), record.get("step")
            if writer is not None:
                for name, value in named:
                    writer.add_scalar(name, value, step)
            if trackers is not None:
                trackers.log(named, step)
            if listener is not None:
                listener(record)

        try:
            yield log
        except BaseException as e:
            if trackers is not None:
                trackers.stop(e)
            raise
        else:
            if trackers is not None:
                trackers.stop(None)
        finally:
            if writer is not None:
                writer.close()


def finish(run_dir: Path, cfg) -> None:
    """The finished run (summary.json, config.yaml, report.html, metrics.jsonl; the weights with
    train.log_artifacts) to the trackers it logged to. runs.finish calls it last, in the run's final folder."""
    if distributed.is_main():
        tracking.finish(run_dir, cfg)
