"""Progress display (default plugin): a rich progress bar with step, loss, lr, tokens/s, ETA.

When stderr is not a terminal (CI, logs piped to a file) it prints one line per record instead.
"""

from ftengine import hookimpl
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

default = True

_console = Console(stderr=True)
_progress = {}


def _format(record):
    parts = []
    for key, value in record.items():
        if key in ("step", "epoch") or value is None:
            continue
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


@hookimpl
def ftengine_on_train_start(model, datasets, state):
    for split, stats in datasets.stats.items():
        if stats and stats.get("truncated"):
            _console.print(
                f"{split}: {stats['truncated']} of {stats['rows']} rows longer than "
                f"train.max_length={state.config.train.max_length} were truncated "
                f"({stats['dropped']} dropped: no response token left)"
            )
    if not _console.is_terminal:
        return
    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=_console,
    )
    progress.start()
    _progress["bar"] = progress
    _progress["task"] = progress.add_task("train", total=state.max_steps, completed=state.step, stats="")


@hookimpl
def ftengine_on_log(state, record):
    bar = _progress.get("bar")
    if bar is None or any(k.startswith("eval_") for k in record) or record.get("loss") is None:
        _console.print(f"step {record['step']}/{state.max_steps} {_format(record)}")
        return
    stats = f"loss {record['loss']:.4f} lr {record['lr']:.2e} {record['tokens_per_s'] or 0:.0f} tok/s"
    bar.update(_progress["task"], completed=record["step"], stats=stats)


@hookimpl
def ftengine_on_train_end(model, state):
    bar = _progress.pop("bar", None)
    if bar is not None:
        bar.stop()
