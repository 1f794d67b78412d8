"""Sleeps ``$FTENGINE_TEST_STEP_SLEEP`` seconds after each step, so a test can signal a running
run (or start a second one) while it is still training. It changes nothing that is trained."""

import os
import time

from ftengine import hookimpl


@hookimpl
def ftengine_on_step_end(state):
    time.sleep(float(os.environ.get("FTENGINE_TEST_STEP_SLEEP", "0.5")))
