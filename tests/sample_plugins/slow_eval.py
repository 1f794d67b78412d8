"""Sleeps ``$FTENGINE_TEST_EVAL_SLEEP`` seconds before each eval batch (the model is in eval
mode), so a test can signal a run during an evaluation. It changes nothing that is computed."""

import os
import time

from ftengine import hookimpl


@hookimpl(hookwrapper=True)
def ftengine_compute_loss(model):
    if not model.training:
        time.sleep(float(os.environ.get("FTENGINE_TEST_EVAL_SLEEP", "0")))
    yield
