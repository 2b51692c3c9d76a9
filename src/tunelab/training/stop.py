"""Stopping a run on purpose: SIGTERM (what `tunelab ui`'s stop button, `kill` and schedulers send) or SIGINT
(Ctrl-C) while the loop trains lets the optimizer step under way finish; the loop then saves a checkpoint and
ends the run as interrupted, resumable with `tunelab train --resume`. A second signal stops at once, as Ctrl-C
always did.

The handlers are installed only in the main thread (Python delivers signals there alone; a run trained from
another thread keeps the signals as they were) and the previous ones come back when the loop ends.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from . import distributed

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run stopped on request after saving a checkpoint: a KeyboardInterrupt, so everything that cleans up
    after Ctrl-C (trackers, the run folder's claim, the CLI's exit code 130) does the same for it."""


class Request:
    """Whether a stop was asked (`signal`: its name), read by the loop after each step."""

    def __init__(self):
        self.signal: str | None = None

    def asked(self) -> bool:
        """True once any process of the run was asked to stop (several processes stop at the same step)."""
        if distributed.world() > 1:
            return distributed.total([1.0 if self.signal else 0.0])[0] > 0
        return self.signal is not None


@contextmanager
def on_signal():
    """`with on_signal() as request:` — SIGINT and SIGTERM set `request.signal` instead of ending the process."""
    request = Request()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if request.signal is not None:  # asked twice: stop now
            raise KeyboardInterrupt
        request.signal = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def terminate_as_interrupt():
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does, outside the loop too (loading, evaluating, saving): a
    stopped `tunelab train` ends as interrupted (exit code 130) wherever it was. Main thread only; restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
