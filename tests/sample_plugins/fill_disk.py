"""Fills the disk under output_dir after step ``$FTENGINE_TEST_FILL_AFTER`` (default 1), as if
another program used up the space: the next checkpoint write runs out of space."""

import errno
import os

from ftengine import hookimpl


@hookimpl
def ftengine_on_step_end(state):
    if state.step != int(os.environ.get("FTENGINE_TEST_FILL_AFTER", "1")):
        return
    with open(state.output_dir / "filler.bin", "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
