"""One stop request per process, honoured wherever the run is: the first SIGINT/SIGTERM asks the run to stop at
its next safe point, a second ends the process at once.

The safe points are where work can be kept and picked up again: between training steps (a checkpoint is saved
first), between the batches of the validation loss, and between the decoding steps of answering questions
(the training results are written by then, and a resume answers without training again). Outside them (loading
data, loading weights) there is nothing to keep, and the first signal stops at once. Each place that can stop
calls `STOP.check()`, which raises `Interrupted`; the level that knows what was kept turns it into the line
that says so (`training/sft.py`, `recipe.py`, `evaluation/standalone.py`).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """A stop asked for by a signal, raised at a safe point."""

    def __init__(self, signal_name: str):
        super().__init__(f"stopped by {signal_name}")
        self.signal_name = signal_name
        self.exit_code = 130 if signal_name == "SIGINT" else 143  # 128 + the signal's number


class StopNow(BaseException):
    """A signal outside any safe point: nothing in flight is worth finishing. A BaseException, so that library
    code catching Exception lets it through."""

    def __init__(self, signal_name: str):
        super().__init__(f"stopped by {signal_name}")
        self.signal_name = signal_name
        self.exit_code = 130 if signal_name == "SIGINT" else 143


class StopRequest:
    def __init__(self):
        self.signal_name: str | None = None
        self.safe = False  # inside a section that checks for the request
        self._previous: dict = {}
        self._on_stop_now: Callable[[], None] | None = None
        self._at_once = False

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self, on_stop_now: Callable[[], None] | None = None, at_once: bool = False) -> None:
        """Take SIGINT and SIGTERM for this process; `on_stop_now` says the line (and records the stop) when a
        second signal ends it. `at_once`: the first signal stops at once, even in a safe section (a data-parallel
        run: its launcher sends every rank SIGTERM as soon as a rank fails or the user stops it, and a rank cannot
        save alone what all of them hold)."""
        self.signal_name, self._on_stop_now, self._at_once = None, on_stop_now, at_once
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:  # a second signal: stop now
            if self._on_stop_now is not None:
                self._on_stop_now()
            sys.stdout.flush()
            sys.stderr.flush()
            # Ended here rather than by an exception, which library code in flight (a save, a progress bar, a
            # finaliser) may print as a traceback or swallow: the line said is the last word.
            os._exit(128 + signum)
        self.signal_name = name
        if not self.safe or self._at_once:
            raise StopNow(name)
        print(f"\n{name} received: stopping at the next safe point (send it again to stop at once)",
              file=sys.stderr, flush=True)

    @contextmanager
    def safe_section(self) -> Iterator[None]:
        """Code inside checks `requested` (or calls `check`) often enough to stop soon and cleanly."""
        before, self.safe = self.safe, True
        try:
            if self.requested:
                raise Interrupted(self.signal_name)
            yield
        finally:
            self.safe = before

    def check(self) -> None:
        if self.requested:
            raise Interrupted(self.signal_name)


STOP = StopRequest()
