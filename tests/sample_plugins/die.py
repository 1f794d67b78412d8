"""Kills its own process with SIGKILL (no Python clean-up, as the OOM killer would) after step
``$FTENGINE_TEST_DIE_AT_STEP`` on rank ``$FTENGINE_TEST_DIE_RANK`` (default 1); with the first variable unset it does nothing, so a test can
see what a run on several processes does when one worker dies. It changes nothing that is trained."""

import os
import signal

from ftengine import hookimpl


@hookimpl
def ftengine_on_step_end(state):
    at = os.environ.get("FTENGINE_TEST_DIE_AT_STEP")
    if at is not None and state.world.rank == int(os.environ.get("FTENGINE_TEST_DIE_RANK", "1")) and state.step == int(at):
        os.kill(os.getpid(), signal.SIGKILL)
