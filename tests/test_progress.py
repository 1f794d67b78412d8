"""The progress plugin keeps a run's console and bar on the run's state, never in module globals."""

import io
from types import SimpleNamespace

import torch
from ftengine.plugins import progress
from ftengine.state import RunState
from rich.console import Console

NO_DATA = SimpleNamespace(stats={})


def run_state(tmp_path, terminal):
    """A run of 4 steps whose display writes to a string, as to a terminal or to a log file."""
    config = SimpleNamespace(train=SimpleNamespace(max_length=16))
    state = RunState(config=config, pm=None, output_dir=tmp_path, device=torch.device("cpu"), max_steps=4)
    console = Console(file=io.StringIO(), force_terminal=terminal, width=200)
    state.plugin_data["progress"] = progress.Display(console)
    return state


def record(step):
    return {"step": step, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 10.0}


def test_two_runs_in_one_process_keep_their_own_bars(tmp_path):
    first, second = run_state(tmp_path / "a", terminal=True), run_state(tmp_path / "b", terminal=True)
    progress.ftengine_on_train_start(model=None, datasets=NO_DATA, state=first)
    progress.ftengine_on_train_start(model=None, datasets=NO_DATA, state=second)
    progress.ftengine_on_log(state=first, record=record(3))
    bars = [state.plugin_data["progress"].bar for state in (first, second)]
    assert bars[0] is not bars[1]
    assert [bar.tasks[0].completed for bar in bars] == [3, 0]
    progress.ftengine_on_train_end(model=None, state=first)
    assert first.plugin_data["progress"].bar is None
    assert bars[1].live.is_started, "ending one run must not stop another run's bar"
    progress.ftengine_on_train_end(model=None, state=second)
    assert not bars[1].live.is_started


def test_without_a_terminal_each_record_is_one_line_and_truncation_is_reported(tmp_path):
    state = run_state(tmp_path, terminal=False)
    datasets = SimpleNamespace(stats={"train": {"rows": 10, "truncated": 3, "dropped": 1}, "eval": {}})
    progress.ftengine_on_train_start(model=None, datasets=datasets, state=state)
    progress.ftengine_on_log(state=state, record=record(2))
    progress.ftengine_on_train_end(model=None, state=state)
    assert state.plugin_data["progress"].console.file.getvalue().splitlines() == [
        "train: 3 of 10 rows longer than train.max_length=16 were truncated (1 dropped: no response token left)",
        "step 2/4 loss=1 lr=0.001 tokens_per_s=10",
    ]


def test_a_run_without_a_display_gets_one_on_stderr(tmp_path):
    state = RunState(config=None, pm=None, output_dir=tmp_path, device=torch.device("cpu"))
    shown = progress.display(state)
    assert shown is progress.display(state) is state.plugin_data["progress"]
    assert shown.console.stderr and shown.bar is None
