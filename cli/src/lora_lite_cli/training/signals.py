"""Ctrl-C and SIGTERM during training: stop at a step boundary and keep a consistent checkpoint.

- The first SIGINT or SIGTERM asks to stop after the current step (a message says so): the
  handler only sets ``requested``; the step loop checks it before and after every step, so the
  stop is prompt whatever the load. ``training.run`` installs it before the model loads.
- A second one stops at once (``KeyboardInterrupt``), except inside ``commit()``: the few lines
  that apply an optimizer step and record it (optimizer.step, scheduler.step, the step counter)
  run as one unit, and a signal landing there takes effect when they are done. So the state the
  checkpoint saves is always "after step N", never "N recorded, N+1 applied".
- While the checkpoint is written (``saving``), further signals only print a note: no traceback,
  no half-written file.
Handlers are installed in the main thread only and restored on exit.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading

NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class StopRequest:
    def __init__(self):
        self.requested = False
        self.saving = False
        self.finishing = False  # the steps are done: no checkpoint, the run ends on its own
        self._in_commit = False
        self._pending = False
        self._previous = {}

    def _handler(self, signum, frame):
        name = NAMES.get(signum, f"signal {signum}")
        if self.saving:
            sys.stderr.write(f"\n{name}: the checkpoint is being written, one moment\n")
            return
        if not self.requested:
            self.requested = True
            if self.finishing:
                sys.stderr.write(f"\n{name}: training is done, the run is being finished "
                                 f"(adapter, evaluation) ({name} again to stop at once)\n")
                return
            sys.stderr.write(f"\n{name}: stopping after this step and saving a checkpoint "
                             f"({name} again to stop at once)\n")
            return
        if self._in_commit:
            self._pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def commit(self):
        """A block that a second signal does not cut in half."""
        self._in_commit = True
        try:
            yield
        finally:
            self._in_commit = False
        if self._pending:
            self._pending = False
            raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in NAMES:
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
        return False
