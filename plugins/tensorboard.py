"""TensorBoard logging: every metrics record, as TensorBoard scalars.

    pip install 'ftengine[tensorboard]'
    ftengine run job.yaml --plugin lora --plugin tensorboard
    tensorboard --logdir runs/contacts/tensorboard

Each number of a record that ``metrics.jsonl`` gets (``loss``, ``lr``, ``grad_norm``,
``eval_*`` ...) becomes a scalar at the record's step, tagged with its key; a baseline
evaluation (a record holding ``"baseline": LABEL``) is tagged ``baseline/LABEL/KEY``. Nulls
(NaN, infinity) and text are left out. The event files go to ``tensorboard.log_dir`` (default
``<output_dir>/tensorboard``), flushed after each record; only rank 0 writes. A resumed run
hides the events of steps after its checkpoint, as ``metrics.jsonl`` drops them; ``--overwrite``
moves the default directory aside with the rest of the earlier run.

An example of a logging plugin: it implements ``ftengine_on_log`` and keeps its writer in
``state.plugin_data["tensorboard"]``.
"""

from pathlib import Path

from ftengine import hookimpl
from ftengine.config import Section
from pydantic import Field

NAME = "tensorboard"


class TensorboardOptions(Section):
    log_dir: str | None = Field(None, description="where the event files go (default: <output_dir>/tensorboard)")


@hookimpl
def ftengine_config_section(register):
    register(NAME, TensorboardOptions)


@hookimpl
def ftengine_validate(config):
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as exc:
        why = "which is not installed" if exc.name == "tensorboard" else f"which does not import ({exc})"
        return [f"plugin 'tensorboard' needs the tensorboard package, {why}: pip install 'ftengine[tensorboard]'"]
    return []


@hookimpl
def ftengine_run_files(config):
    # --overwrite moves an earlier run's events aside; a log_dir of the user's own is left alone.
    return ["tensorboard"] if config.tensorboard.log_dir is None else []


def log_dir(state):
    """Where the run's event files go."""
    return Path(state.config.tensorboard.log_dir or state.output_dir / "tensorboard")


@hookimpl
def ftengine_on_train_start(state):
    if not state.world.is_main:
        return
    from torch.utils.tensorboard import SummaryWriter

    # Events at or after purge_step written earlier into this log_dir are hidden: a resumed run
    # logs again from the step after its checkpoint, and a fresh run from step 0.
    purge_step = state.step + 1 if state.step else 0
    state.plugin_data[NAME] = SummaryWriter(log_dir=str(log_dir(state)), purge_step=purge_step)


def tag(record, key):
    """The TensorBoard tag of ``record[key]``."""
    return f"baseline/{record['baseline']}/{key}" if "baseline" in record else key


def scalars(record):
    """``{tag: number}`` of a record: every number but its step (no null, text or bool)."""
    return {
        tag(record, key): value
        for key, value in record.items()
        if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)
    }


@hookimpl
def ftengine_on_log(state, record):
    writer = state.plugin_data.get(NAME)
    if writer is None:  # ftengine_on_log runs on rank 0 only, after ftengine_on_train_start
        return
    for name, value in scalars(record).items():
        writer.add_scalar(name, value, global_step=record["step"])
    writer.flush()


@hookimpl
def ftengine_on_train_end(state):
    writer = state.plugin_data.pop(NAME, None)
    if writer is not None:
        writer.close()
