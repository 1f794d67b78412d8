"""Small records passed between the core and plugins."""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .distributed import World


def token_count(example):
    """The tokens of an example that holds one sequence (``input_ids``)."""
    return len(example["input_ids"])


@dataclass
class Datasets:
    """What ``ftengine_load_dataset`` returns.

    ``train`` and ``eval`` are lists of examples (dicts); ``collate`` pads a list of examples
    into a batch of tensors. Each example keeps its source row under ``"row"`` for metrics that
    need the raw text (generation-based evaluation). ``eval_sets`` holds the further evaluation
    sets of ``data.eval_sets``; ``ftengine_eval_metrics`` sees each as ``eval``, named by
    ``eval_name``. ``length`` gives an example's tokens, for ``train.group_by_length``; a
    dataset whose examples hold several sequences (a preference pair) gives its own.
    ``steps_per_batch``: how many consecutive optimiser steps train on the same micro-batches
    (``grpo.num_iterations``: several passes over one generation batch).
    """

    train: list
    eval: list
    collate: Callable[[list], dict]
    stats: dict = field(default_factory=dict)
    eval_sets: dict = field(default_factory=dict)  # {name: examples}, from data.eval_sets
    eval_name: str | None = None  # while one of eval_sets is evaluated, its name
    length: Callable[[dict], int] = token_count
    steps_per_batch: int = 1


@dataclass
class LossOutput:
    """A micro-batch loss as a sum over ``count`` units (target tokens, preference pairs)."""

    loss: torch.Tensor
    count: int
    metrics: dict = field(default_factory=dict)


@dataclass
class RunState:
    """The state of a run that plugins may read (and, for ``plugin_data``, write)."""

    config: Any
    pm: Any
    output_dir: Path
    device: torch.device
    autocast_dtype: torch.dtype | None = None
    step: int = 0
    max_steps: int = 0
    epoch: int = 0
    tokens_seen: int = 0
    #: The name of the adapter this run trains (``AdapterMethod.adapter_name``); ``None`` when the
    #: method trains the model's own weights (full fine-tuning).
    adapter_name: str | None = None
    #: What ``ftengine.build.build`` reports: weight bytes before/after quantisation, trainable names.
    build_info: dict = field(default_factory=dict)
    #: ``Datasets.stats``: example counts, truncation.
    data_stats: dict = field(default_factory=dict)
    #: This process's place among the run's processes (``ftengine.distributed.World``): ``rank``,
    #: ``size``, ``is_main`` (rank 0, the one that writes files).
    world: Any = field(default_factory=lambda: World())
    #: Call between the rows or batches of a long evaluation: it raises (and the run saves a
    #: checkpoint and stops) when SIGINT/SIGTERM asked the run to stop. On several processes
    #: every rank must call it at the same points (it agrees with the others).
    check_stop: Callable[[], None] = field(default_factory=lambda: _never_stop)
    #: A namespace per plugin for run-scoped objects (a progress display, DPO's reference):
    #: a plugin keeps them under its own name, ``state.plugin_data["progress"]``, never in module globals.
    plugin_data: dict[str, Any] = field(default_factory=dict)


def _never_stop():
    """``RunState.check_stop`` outside a training run (an evaluation on its own)."""
