"""Progress display (default plugin): a rich progress bar with step, loss, lr, tokens/s, ETA.

When stderr is not a terminal (CI, logs piped to a file) it prints one line per record instead.
A run's console and bar live in ``state.plugin_data["progress"]``, so runs never share them.
"""

from dataclasses import dataclass

from ftengine import hookimpl
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

default = True


@dataclass
class Display:
    """What one run shows its progress with: the bar only on a terminal."""

    console: Console
    bar: Progress | None = None
    task: TaskID | None = None


def display(state):
    """The run's ``Display``, made at its first use."""
    return state.plugin_data.setdefault("progress", Display(Console(stderr=True)))


def _format(record):
    parts = []
    for key, value in record.items():
        if key in ("step", "epoch") or value is None:
            continue
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


@hookimpl
def ftengine_on_train_start(model, datasets, state):
    shown = display(state)
    for split, stats in datasets.stats.items():
        if stats and stats.get("truncated"):
            shown.console.print(
                f"{split}: {stats['truncated']} of {stats['rows']} rows longer than "
                f"train.max_length={state.config.train.max_length} were truncated "
                f"({stats['dropped']} dropped: no response token left)"
            )
    if not shown.console.is_terminal:
        return
    shown.bar = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=shown.console,
    )
    shown.bar.start()
    shown.task = shown.bar.add_task("train", total=state.max_steps, completed=state.step, stats="")


@hookimpl
def ftengine_on_log(state, record):
    shown = display(state)
    if shown.bar is None or any(k.startswith("eval_") for k in record):
        shown.console.print(f"step {record['step']}/{state.max_steps} {_format(record)}")
        return
    stats = f"loss {record['loss']:.4f} lr {record['lr']:.2e} {record['tokens_per_s'] or 0:.0f} tok/s"
    shown.bar.update(shown.task, completed=record["step"], stats=stats)


@hookimpl
def ftengine_on_train_end(model, state):
    shown = display(state)
    if shown.bar is not None:
        shown.bar.stop()
        shown.bar = None
