"""Stopping a run cleanly on SIGINT (Ctrl-C) and SIGTERM (what preemptible machines send).

    with StopSignals() as stop:
        stop.arm("finishing the current step, then saving a checkpoint")  # what a signal now does
        while ...:
            step()
            if stop.signum: save a checkpoint, raise RunInterrupted(...)

Before ``arm`` (loading, reading data) a signal stops the run at once: there is nothing to
save. Once armed, the first signal only sets ``signum``; the loop finishes the step, writes a
checkpoint and stops with exit status 128 + signal (130 for SIGINT, 143 for SIGTERM). A second
signal raises ``SignalInterrupt`` (a ``KeyboardInterrupt``) at once (temporary files are cleaned up; the last complete
checkpoint stays).

An evaluation checks ``stop.check(world)`` between its batches (plugins call
``state.check_stop()`` between theirs): a signal raises ``StopRequested`` there, and the loop
writes the checkpoint of the step at once instead of waiting for the whole evaluation.

On several processes the loop agrees on stopping with the other ranks after each step (the
largest ``signum``, an all-reduce) without writing the result back: ``signum`` stays this
rank's own, so a signal that lands during that all-reduce counts at the next step.
"""

import os
import signal
import threading

from .errors import FtengineError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(FtengineError):
    """The run stopped on a signal after saving a checkpoint; ``exit_code`` is 128 + the signal."""

    def __init__(self, message, signum, step=None, checkpoint=None):
        super().__init__(message)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum


class StopRequested(Exception):
    """A stop signal cut an evaluation short (``StopSignals.check``); ``signum`` is the signal.
    The loop catches it, writes a checkpoint and stops."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SignalInterrupt(KeyboardInterrupt):
    """A signal that stops the run at once (before training started, or the second one)."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


class StopSignals:
    """Install SIGINT/SIGTERM handlers for the block (main thread only; elsewhere a no-op)."""

    def __init__(self):
        self.signum = None
        self.armed = False
        self.doing = ""
        self._previous = {}

    def arm(self, doing):
        """From now on a first signal only sets ``signum``; ``doing`` says what happens next."""
        self.armed, self.doing = True, doing

    def check(self, world):
        """Raise ``StopRequested`` if a signal reached any rank: called between the batches of
        an evaluation, so a signal need not wait for all of it. A collective on several
        processes: every rank calls it at the same points."""
        agreed = world.max(self.signum or 0)
        if agreed:
            raise StopRequested(agreed)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        if not self.armed or self.signum is not None:
            self.signum = self.signum or signum
            raise SignalInterrupt(signum)
        self.signum = signum
        name = signal.Signals(signum).name
        again = "Ctrl-C" if signum == signal.SIGINT else name
        # os.write: printing from a signal handler must not re-enter a buffered stream.
        os.write(2, f"\n{name}: {self.doing} ({again} again stops at once)\n".encode())
