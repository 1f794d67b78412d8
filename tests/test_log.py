"""One output channel (``ftengine.log``): what a run and its plugins tell the user goes to stderr
through the ``ftengine`` logger, from rank 0 only; the plugin index is built once per process."""

import logging

from ftengine import pluginmanager
from ftengine.log import note, warn


def test_notes_and_warnings_go_to_stderr_through_the_ftengine_logger(capsys, caplog):
    logging.getLogger("ftengine").addHandler(caplog.handler)
    try:
        note("qlora: model weights 1.0 MiB -> 0.3 MiB")
        warn("[not markup] an adapter trained on another base")
    finally:
        logging.getLogger("ftengine").removeHandler(caplog.handler)
    err = capsys.readouterr().err
    assert "qlora: model weights 1.0 MiB -> 0.3 MiB" in err
    assert "warning: [not markup] an adapter trained on another base" in err  # user text is not rich markup
    assert [r.levelname for r in caplog.records] == ["INFO", "WARNING"]


def test_only_rank_zero_speaks_unless_every_rank_is_asked_to(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    note("from rank 1")
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("FTENGINE_LOG_ALL_RANKS", "1")
    note("from rank 1, asked")
    assert "from rank 1, asked" in capsys.readouterr().err


def test_the_plugin_index_is_built_once_per_process():
    assert pluginmanager.builtin_plugins() is pluginmanager.builtin_plugins()
    assert pluginmanager.entry_point_plugins() is pluginmanager.entry_point_plugins()
