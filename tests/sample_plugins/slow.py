"""Sleeps ``$FTENGINE_TEST_STEP_SLEEP`` seconds after each step, so a test can signal a running
run (or start a second one) while it is still training; and, while the file
``$FTENGINE_TEST_HOLD_FILE`` exists, waits after each step, so the run is certainly still alive
however slowly the test's other processes start on a loaded machine. It changes nothing that is
trained."""

import os
import time
from pathlib import Path

from ftengine import hookimpl


@hookimpl
def ftengine_on_step_end(state):
    time.sleep(float(os.environ.get("FTENGINE_TEST_STEP_SLEEP", "0.5")))
    hold = os.environ.get("FTENGINE_TEST_HOLD_FILE")
    while hold and Path(hold).exists():
        time.sleep(0.05)
