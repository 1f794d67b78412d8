"""Errors ftengine raises for bad input. Each message names the file, line, key or plugin and
says how to fix it; the CLI prints them without a traceback."""


class FtengineError(Exception):
    """Base class: an error the user can fix."""


class ConfigError(FtengineError):
    """One or more configuration problems, all reported together."""

    def __init__(self, problems):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} configuration problem(s):\n{lines}")


class PluginError(ConfigError):
    """Problems with the selected plugin set (unknown, conflicting, missing requirements)."""


class DataError(FtengineError):
    """A bad data file or row; the message starts with ``file:line``."""


class AdapterError(FtengineError):
    """An adapter that does not fit the model it is loaded into."""


class RunDirError(FtengineError):
    """An output directory that cannot be used: a file, not writable, in use by another run, or
    holding an earlier run that a fresh run would mix with."""


class StorageError(FtengineError):
    """A file that could not be written (disk full, permissions); the message names the path and
    says what was kept intact."""
