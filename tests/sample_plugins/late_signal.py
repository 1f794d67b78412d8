"""Sends SIGTERM to rank 0 while it waits in the collective after step
``$FTENGINE_TEST_SIGNAL_AT_STEP`` where the ranks agree whether to stop: rank 0 has already
given its "no signal", and rank 1 (which gets no signal) is held back 2 s before it gives its
own. So the signal reaches rank 0 after its vote was cast, as a signal sent to every rank at a
random moment sometimes does. With the variable unset it does nothing; it changes nothing that
is trained."""

import os
import signal
import threading
import time

from ftengine import hookimpl


@hookimpl
def ftengine_on_step_end(state):
    at = os.environ.get("FTENGINE_TEST_SIGNAL_AT_STEP")
    if at is None or state.step != int(at):
        return
    if state.world.rank == 0:
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    else:
        time.sleep(2.0)
