"""Caps the size of every file this process writes (``RLIMIT_FSIZE``) after step
``$FTENGINE_TEST_LIMIT_AFTER`` at the size ``metrics.jsonl`` then has plus 40 bytes, as a disk
that fills up: the next metrics record is cut off after 40 bytes. SIGXFSZ is ignored, so the
write fails with ``EFBIG`` instead of killing the process."""

import os
import resource
import signal

from ftengine import hookimpl


@hookimpl
def ftengine_on_step_end(state):
    if state.step != int(os.environ.get("FTENGINE_TEST_LIMIT_AFTER", "1")):
        return
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    size = (state.output_dir / "metrics.jsonl").stat().st_size
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 40, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
