"""One output channel for what a run and its plugins tell the user: ``note`` and ``warn``.

    from ftengine.log import note, warn
    note("qlora: model weights 540.0 MiB -> 170.1 MiB")
    warn("an adapter trained on another base")

Messages go to the logger ``ftengine`` (stdlib ``logging``), which prints them on stderr with
rich, whole lines that a terminal wraps but never breaks (paths stay copy-pasteable). In a run
on several processes only rank 0 prints, unless ``FTENGINE_LOG_ALL_RANKS=1``; a program that
embeds ftengine can attach its own handlers to ``logging.getLogger("ftengine")``.
"""

import logging
import os

from rich.console import Console
from rich.markup import escape

logger = logging.getLogger("ftengine")


class _RichStderr(logging.Handler):
    """Prints each record on stderr (the stream of the moment: tests capture it)."""

    def emit(self, record):
        text = escape(record.getMessage())
        style = getattr(record, "style", None)
        if record.levelno >= logging.WARNING:
            text = f"[yellow]warning:[/yellow] {text}"
        elif style:
            text = f"[{style}]{text}[/{style}]"
        Console(stderr=True, soft_wrap=True).print(text, highlight=False)


def _rank_zero(record):
    """Only rank 0 of a launched run speaks, unless every rank is asked to."""
    return os.environ.get("RANK", "0") == "0" or os.environ.get("FTENGINE_LOG_ALL_RANKS") == "1"


if not logger.handlers:
    _handler = _RichStderr()
    _handler.addFilter(_rank_zero)
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def note(message, style=None):
    """Tell the user something about the run (``style``: a rich style, e.g. ``"dim"``)."""
    logger.info(message, extra={"style": style})


def warn(message):
    """Warn the user; printed as ``warning: message``."""
    logger.warning(message)
