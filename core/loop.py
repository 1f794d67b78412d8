"""The training loop: train and save. Read ``train`` top to bottom.

Every step that a method changes (loading, quantising, adapters, data, loss, optimiser,
evaluation, saving) is a hook call (``ftengine.build`` builds the model); this file only orders
them and keeps the books: gradient accumulation, clipping, the schedule, logging, checkpoints
and resume.

A run never loses work: it owns its ``output_dir`` (``ftengine.rundir``); it reads and checks
all data before the model's weights load; ``--resume`` checks the checkpoint's config against
the run's; a step whose loss or gradient norm is NaN/inf never reaches the optimiser
(``train.on_nonfinite``); SIGINT/SIGTERM finish the step, or stop an evaluation at its next
batch, and write a checkpoint (``ftengine.signals``); ``final/`` is saved before the final
evaluation; ``metrics.jsonl`` gets whole lines only.

On several processes (``ftengine.distributed``) the same loop runs on every rank: a global
micro-batch is split between the ranks, the loss sums and counts are summed over them, and
rank 0 alone writes; see ``docs/distributed.md``.
"""

import json
import math
import os
import random
import signal
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from . import checkpoint
from .adapters import write_base
from .build import build
from .config import dump_config, resume_safe_keys
from .data import local_files
from .distributed import Parallel, World, local_batch, parallel_plugin_names, parallelize, process_group
from .errors import ConfigError, DataError, FtengineError, PluginError, StorageError
from .evaluation import evaluate, evaluate_baselines, few_shot_examples
from .log import note
from .methods import adapter_methods
from .modeling import autocast, autocast_dtype_for, to_device
from .pluginmanager import nondefault_implementers
from .rundir import RunDir, claim_output_dir, open_run_file, run_inputs
from .signals import RunInterrupted, StopRequested, StopSignals
from .state import RunState, token_count


class NonFiniteError(FtengineError):
    """A step's loss or gradient norm was NaN or infinite and ``train.on_nonfinite`` says stop."""


def lr_lambda(warmup, total, min_ratio):
    """Linear warmup to 1, then cosine decay to ``min_ratio``."""

    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        done = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    return factor


def micro_batch_rows(datasets, config, index):
    """``(epoch, examples)`` of the ``index``-th micro-batch of the run: epochs are seeded
    shuffles of the train set. The same on every rank: ``train.batch_size`` is global."""
    per_epoch = math.ceil(len(datasets.train) / config.train.batch_size)
    epoch, position = divmod(index, per_epoch)
    start = position * config.train.batch_size
    chosen = epoch_order(datasets.train, config.train, epoch, datasets.length)[start : start + config.train.batch_size]
    return epoch, [datasets.train[i] for i in chosen]


GROUPED_BATCHES = 64  # train.group_by_length sorts this many batches' worth of examples at a time


def epoch_order(examples, options, epoch, length=token_count):
    """The order of the examples in ``epoch``: a shuffle seeded by ``train.seed`` and the epoch.

    With ``train.group_by_length`` each chunk of ``GROUPED_BATCHES`` batches is sorted by
    ``length`` (``Datasets.length``), cut into batches, and the full batches are shuffled (seeded; a short last batch
    stays last), so a batch pads little and lengths do not trend through the epoch.
    """
    generator = torch.Generator().manual_seed(options.seed + epoch)
    order = torch.randperm(len(examples), generator=generator).tolist()
    if not options.group_by_length:
        return order
    size, chunk = options.batch_size, options.batch_size * GROUPED_BATCHES
    grouped = []
    for start in range(0, len(order), chunk):
        grouped += sorted(order[start : start + chunk], key=lambda i: length(examples[i]), reverse=True)
    complete = len(grouped) // size
    batches = [grouped[b * size : (b + 1) * size] for b in torch.randperm(complete, generator=generator).tolist()]
    return [i for batch in batches for i in batch] + grouped[complete * size :]


def micro_batch(datasets, config, index):
    """The ``index``-th micro-batch of the run, collated."""
    epoch, examples = micro_batch_rows(datasets, config, index)
    return epoch, datasets.collate(examples)


def total_steps(config, n_train, steps_per_batch=1):
    if config.train.max_steps:
        return config.train.max_steps
    per_epoch = math.ceil(n_train / config.train.batch_size)
    return max(1, math.ceil((config.train.epochs or 1) * per_epoch / config.train.grad_accum) * steps_per_batch)


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def log(state, record, metrics_file):
    """Hand a metrics record to the plugins and append it to ``metrics.jsonl`` (rank 0 only:
    the other ranks have no ``metrics_file``).

    NaN and infinity become ``null``: JSON has no such numbers, and ``metrics.jsonl`` stays
    readable by any JSON parser.
    """
    if metrics_file is None:
        return
    record = {key: _finite_or_none(value) for key, value in record.items()}
    state.pm.hook.ftengine_on_log(state=state, record=record)
    metrics_file.append(record)


class MetricsFile:
    """``metrics.jsonl`` open for appending, one record per line: a record is appended whole or
    not at all, so a full disk never leaves a torn line for ``--resume`` to trip over."""

    def __init__(self, path):
        self.path = path
        self._file = open_run_file(path)  # never through a planted link
        self._fd = self._file.fileno()  # written with os.write, not through the file's buffer

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()

    def append(self, record):
        """Append ``record`` as one line of JSON (unbuffered: a reader sees every step at once).

        :raises StorageError: the write failed (disk full, ...); the file is cut back to the
            records before ``record``.
        """
        line = (json.dumps(record, allow_nan=False) + "\n").encode()
        whole = os.fstat(self._fd).st_size
        try:
            written = 0
            while written < len(line):  # a write may take part of it: write the rest
                written += os.write(self._fd, line[written:])
        except OSError as exc:
            os.ftruncate(self._fd, whole)
            raise checkpoint.storage_error(
                exc, self.path, f"the metrics of step {record['step']}", "The records before it are intact"
            ) from exc


def metrics_records(path):
    """``[(line, record)]`` of ``metrics.jsonl``, and the number of a torn last line (``None``
    when there is none): what a write cut short (a full disk, a killed machine) leaves.

    :raises DataError: a line before the last is not a JSON record, naming the file and line.
    """
    lines = path.read_text().splitlines() if path.exists() else []
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    records, torn = [], None
    for number, line in numbered:
        try:
            records.append((line, json.loads(line)))
        except json.JSONDecodeError as exc:
            if number != numbered[-1][0]:
                raise DataError(
                    f"{path}:{number}: not a whole JSON record ({exc.msg}); --resume rewrites the metrics after its "
                    f"checkpoint and needs the ones before: repair or delete that line, then resume again"
                ) from exc
            torn = number
    return records, torn


def _restart_metrics(path, step):
    """Keep the metrics of steps up to ``step`` (a resumed run rewrites what follows), except
    the evaluation of ``step`` itself: a checkpoint is written before its step's evaluation,
    which the resumed run does again. A torn last line is dropped, and said so."""
    records, torn = metrics_records(path)
    if torn:
        note(f"{path}:{torn}: dropped a torn last line (a write cut short, e.g. when the disk filled up)")
    if not records and not torn:
        return
    kept = [
        line
        for line, record in records
        if record.get("step", 0) < step or (record.get("step", 0) == step and "eval_time_s" not in record)
    ]
    checkpoint.atomic_write_text(path, "".join(line + "\n" for line in kept))


def train(config, pm, resume=False, eval_before=False, overwrite=False):
    """Run a whole training job; return a summary dict.

    :param resume: continue from the newest healthy checkpoint in ``config.output_dir``.
    :param eval_before: evaluate the model before the first step too (the before/after table).
    :param overwrite: start afresh even if ``output_dir`` holds an earlier run (its files are
        moved into ``replaced-<time>/``).
    :raises RunInterrupted: SIGINT/SIGTERM stopped the run after a checkpoint was written.
    :raises NonFiniteError: a step's loss or gradient norm was not finite.
    """
    output_dir = Path(config.output_dir)
    with (
        process_group(config) as world,
        own_output_dir(world, output_dir, resume, overwrite, plugin_run_files(pm, config), run_inputs(config)) as run_dir,
        StopSignals() as stop,
    ):
        if run_dir.moved_to and world.is_main:
            note(f"--overwrite: the earlier run in {output_dir} was moved to {run_dir.moved_to}")
        return _train(config, pm, output_dir, resume, eval_before, stop, world)


def plugin_run_files(pm, config):
    """What the active plugins write into ``output_dir`` (hook ``ftengine_run_files``): names
    inside it, since ``--overwrite`` moves them; anything else is refused, naming the plugin."""
    files, problems = [], []
    for impl in pm.hook.ftengine_run_files.get_hookimpls():
        names = impl.function(config=config) or []
        inside = isinstance(names, (list, tuple)) and all(
            isinstance(n, str) and n and not Path(n).is_absolute() and ".." not in Path(n).parts for n in names
        )
        if not inside:
            problems.append(
                f"plugin '{impl.plugin_name}': ftengine_run_files returned {names!r}; return a list of names "
                f"inside output_dir, such as ['events', 'cache/index.json']"
            )
        else:
            files += names
    if problems:
        raise PluginError(problems)
    return files


@contextmanager
def own_output_dir(world, output_dir, resume, overwrite, plugin_files, inputs):
    """Claim ``output_dir`` (``ftengine.rundir``) for the block: rank 0 holds the lock, and
    every rank learns whether it got it."""
    with ExitStack() as stack:
        claimed = world.on_main(
            lambda: stack.enter_context(
                claim_output_dir(output_dir, resume=resume, overwrite=overwrite, plugin_files=plugin_files, inputs=inputs)
            )
        )
        yield claimed or RunDir(path=output_dir)


def _train(config, pm, output_dir, resume, eval_before, stop, world):
    started = time.perf_counter()
    if resume:  # a damaged metrics.jsonl stops the run before the weights load
        world.on_main(lambda: metrics_records(output_dir / "metrics.jsonl"))
    run = prepare(config, pm, output_dir, resume, world)
    model, state, train_options = run.model, run.state, config.train
    summary, skipped = (
        {"before": None, "baselines": {}, "after": None, "setup_s": time.perf_counter() - started, "train_s": 0.0},
        0,
    )
    state.check_stop = partial(stop.check, world)
    with ExitStack() as files:
        metrics_file = files.enter_context(MetricsFile(output_dir / "metrics.jsonl")) if world.is_main else None
        pm.hook.ftengine_on_train_start(model=model, tokenizer=run.tokenizer, datasets=run.datasets, state=state)
        if not resume:
            summary["baselines"] = evaluate_baselines(model, run.tokenizer, run.datasets, state)
            for label, record in summary["baselines"].items():
                log(state, {"step": 0, "baseline": label, **record}, metrics_file)
        if eval_before and not resume:
            summary["before"] = {"step": 0, **evaluate(model, run.tokenizer, run.datasets, state)}
            log(state, summary["before"], metrics_file)
        model.train()
        stop.arm("finishing the current step, then saving a checkpoint")
        # A step's checkpoint is written before its evaluation: a run resumed from one evaluates first.
        saved = world.on_main(lambda: checkpoint.latest_checkpoint(output_dir)) if resume else None
        if resume and evaluation_due(state):
            evaluate_and_log(run, stop, metrics_file, saved)
        while state.step < state.max_steps:
            record = optimizer_step(run)
            summary["train_s"] += record["step_time_s"]
            if record.get("skipped"):
                skipped += 1
                if train_options.on_nonfinite == "stop" or skipped > train_options.max_nonfinite_skips:
                    log(state, record, metrics_file)
                    raise nonfinite_error(state, record, skipped)
            if state.step % train_options.log_every == 0 or state.step == state.max_steps or record.get("skipped"):
                log(state, record, metrics_file)
            saved = save_checkpoint(run) if train_options.save_every and state.step % train_options.save_every == 0 else None
            if evaluation_due(state):
                evaluate_and_log(run, stop, metrics_file, saved)
            pm.hook.ftengine_on_step_end(model=model, state=state)
            # Every rank stops after the same step, whichever rank the signal reached. What they
            # agree on is not written back to ``stop.signum``: a signal that lands while this
            # rank waits in the collective, its own 0 already given, must count next step.
            agreed = world.max(stop.signum or 0)
            if agreed:
                raise interrupted(agreed, state, saved or save_checkpoint(run))
        # The result is saved before the final evaluation: a signal during it (even a second,
        # which stops at once) loses nothing.
        stop.arm("finishing saving the result, then saving a checkpoint")
        with run.parallel.full_model() as whole:
            refuse_nonfinite_result(run, whole)
            summary["saved"] = world.on_main(lambda: save(whole, run.tokenizer, config, pm, output_dir / "final"))
        summary["after"] = evaluate_and_log(run, stop, metrics_file, saved, result=summary["saved"])
        pm.hook.ftengine_on_train_end(model=model, state=state)
    return summary | {"output_dir": str(output_dir), "build": state.build_info, "data": run.datasets.stats}


def evaluation_due(state):
    """Whether step ``state.step`` is followed by a ``train.eval_every`` evaluation (the final
    evaluation is apart)."""
    every = state.config.train.eval_every
    return bool(every) and state.step % every == 0 and state.step < state.max_steps


def evaluate_and_log(run, stop, metrics_file, step_checkpoint, result=None):
    """Evaluate at the current step and log the record; return it. A stop signal cuts the
    evaluation short: the run stops with a checkpoint of this step (``step_checkpoint`` when
    one is written already, else a new one), which ``--resume`` evaluates again.

    :param result: where ``final/`` was saved, for the final evaluation (the message says so).
    """
    state, doing = run.state, stop.doing
    stop.arm("stopping the evaluation, then saving a checkpoint")
    try:
        record = {"step": state.step, **evaluate(run.model, run.tokenizer, run.datasets, state)}
    except StopRequested as stopped:
        saved = step_checkpoint or save_checkpoint(run)
        raise interrupted(stopped.signum, state, saved, evaluating=True, result=result) from None
    stop.arm(doing)
    log(state, record, metrics_file)
    return record


@dataclass
class Run:
    """What a training run works with, once prepared."""

    model: torch.nn.Module  # the model itself; ``parallel.model`` is what the loss is computed with
    tokenizer: object
    datasets: object
    params: dict  # {name: parameter} of the trainable parameters, in a fixed order
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: RunState
    parallel: Parallel
    data_sha256: dict | None = None  # {training data file: sha256}, recorded in checkpoints for --resume


def prepare(config, pm, output_dir, resume, world=None):
    """Read the data (before the slow weights), build the model, let a parallelism plugin wrap
    it, build the optimiser and schedule, and start afresh or restore the checkpoint
    ``--resume`` continues."""
    world = world or World()
    tokenizer = load_tokenizer(config, pm)
    datasets = load_data(config, pm, tokenizer) if tokenizer is not None else None
    resume_from = world.on_main(lambda: find_resume_checkpoint(output_dir, config)) if resume else None
    model, model_tokenizer, info = build(config, pm, device=world.device)
    tokenizer = tokenizer or model_tokenizer
    datasets = datasets or load_data(config, pm, tokenizer)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ConfigError(
            ["no trainable parameters: the active method plugins selected none (run 'ftengine plugins' to list them)"]
        )
    if config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    device = world.device or next(model.parameters()).device
    autocast_dtype = autocast_dtype_for(config.train.precision, device)
    parallel = parallelize(pm, model, list(params.items()), config, world)
    parallel.store_frozen_weights_in(autocast_dtype)
    model = parallel.unwrap()
    # A parallelism plugin may replace the parameters (by shards): take them again, by name.
    params = {n: p for n, p in model.named_parameters() if n in params}
    optimizer = pm.hook.ftengine_make_optimizer(model=model, params=list(params.items()), config=config)
    max_steps = total_steps(config, len(datasets.train), datasets.steps_per_batch)
    schedule = lr_lambda(config.train.warmup_steps, max_steps, config.train.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    state = RunState(
        config=config,
        pm=pm,
        output_dir=output_dir,
        device=device,
        autocast_dtype=autocast_dtype,
        max_steps=max_steps,
        adapter_name=info["adapter_name"],
        build_info=info,
        data_stats=datasets.stats,
        world=world,
    )
    run = Run(model, tokenizer, datasets, params, optimizer, scheduler, state, parallel)
    start_or_resume(run, resume_from)
    return run


def save_checkpoint(run):
    """Checkpoint the run at its current step (marked unhealthy if a weight is not finite).

    Every rank takes part (the trainable state is gathered whole); rank 0 writes, in the
    format of a single process, so any world size resumes from it.
    """
    state, parallel = run.state, run.parallel
    optimizer_state = parallel.full_optimizer_state(run.optimizer)
    with parallel.full_model() as whole:
        params = trainable(whole, run.params)
        return state.world.on_main(
            lambda: checkpoint.save_checkpoint(
                state.output_dir,
                state.step,
                params,
                None,
                run.scheduler,
                {"tokens_seen": state.tokens_seen, "data_sha256": run.data_sha256},
                healthy=not nonfinite_names(params),
                config=dump_config(state.config),
                optimizer_state=optimizer_state,
            )
        )


def trainable(model, params):
    """``{name: parameter}`` of ``model`` for the names in ``params``, in their order."""
    found = dict(model.named_parameters())
    return {name: found[name] for name in params}


def refuse_nonfinite_result(run, full_model):
    bad = nonfinite_names(trainable(full_model, run.params))
    if bad:
        raise FtengineError(
            f"the trained weights hold NaN or infinity ({', '.join(bad[:3])}); final/ was not written. "
            f"Lower train.lr and start again (the last healthy checkpoint: {checkpoint.latest_checkpoint(run.state.output_dir)})"
        )


def load_tokenizer(config, pm):
    """The run's tokenizer before any weights load, or ``None`` when a plugin loads the model
    but provides no ``ftengine_load_tokenizer`` (then the data is read after the model)."""
    if nondefault_implementers(pm, "ftengine_load_model") and not nondefault_implementers(pm, "ftengine_load_tokenizer"):
        return None
    return pm.hook.ftengine_load_tokenizer(config=config)


def load_data(config, pm, tokenizer):
    """Read, validate and tokenise all the data (``ftengine_load_dataset``)."""
    datasets = pm.hook.ftengine_load_dataset(config=config, tokenizer=tokenizer)
    if not datasets.train:
        raise FtengineError(f"{config.data.train}: no training example left after truncation (raise train.max_length)")
    if "few_shot" in config.eval.baselines:
        few_shot_examples(datasets, config)  # a k larger than the training set fails now, not after the model loads
    return datasets


def find_resume_checkpoint(output_dir, config):
    """The newest checkpoint that verifies (``checkpoint.verification_problem``; the newer ones
    that do not are named, with why), after checking its recorded config and training data
    against ``config``'s.

    :raises StorageError: no checkpoint verifies.
    :raises ConfigError: naming every changed key that changes what is trained.
    :raises DataError: a training data file changed since the run started.
    """
    if not checkpoint.checkpoint_dirs(output_dir):
        raise FtengineError(
            f"{output_dir}: --resume given but no complete checkpoint found in {output_dir / checkpoint.CHECKPOINTS}"
        )
    latest, failed = checkpoint.newest_verified(output_dir)
    for path, problem in failed:
        note(f"resume: {path} failed verification: {problem}")
    if latest is None:
        raise StorageError(
            f"{output_dir / checkpoint.CHECKPOINTS}: no checkpoint verifies ("
            + "; ".join(f"{path.name}: {problem}" for path, problem in failed)
            + "); the run cannot be continued: start it again with --overwrite (moves these aside), or in another output_dir"
        )
    if failed:
        note(f"resume: resuming from {latest}, the newest checkpoint that verifies")
    if not (latest / checkpoint.MANIFEST).is_file():
        note(
            f"resume: {latest.name} has no manifest (written by an earlier version): only its files, "
            f"step and finite weights were checked"
        )
    saved = checkpoint.checkpoint_config(latest)
    if saved is None and (output_dir / "config.json").is_file():  # checkpoints from before config.json
        saved = json.loads((output_dir / "config.json").read_text())
    if saved is not None:
        safe_keys = {**checkpoint.RESUME_SAFE_KEYS, **resume_safe_keys(config)}
        errors, accepted = checkpoint.compare_configs(
            saved, dump_config(config), resume_safe_plugins=parallel_plugin_names(), resume_safe_keys=safe_keys
        )
        if errors:
            raise ConfigError(
                [f"{key}: {before!r} in {latest.name}, {after!r} now" for key, before, after in errors]
                + [
                    f"--resume continues the run {latest} was trained with: put these keys back, or start a new run "
                    f"(another output_dir, or --overwrite)"
                ]
            )
        for key, before, after in accepted:
            note(f"resume: accepted {key}: {before!r} -> {after!r} ({safe_keys[key]})")
    refuse_changed_training_data(checkpoint.read_state(latest).get("data_sha256"), config, latest)
    return latest


def training_data_hashes(config):
    """``{file: sha256}`` of the training data files (``{}`` for a hub dataset: not hashed)."""
    if not config.data.train or not Path(config.data.train).exists():
        return {}
    return {str(file): checkpoint.sha256_file(file) for file in local_files(Path(config.data.train))}


def refuse_changed_training_data(recorded, config, latest):
    """Raise ``DataError`` if a training data file differs from the one the run started with
    (``recorded``, from checkpoint ``latest``; ``None`` for checkpoints from before hashes)."""
    if not recorded:
        return
    current = training_data_hashes(config)
    changes = [
        f"{file}: {'removed' if file not in current else 'added' if file not in recorded else 'changed'} since the run started"
        for file in sorted(set(recorded) | set(current))
        if recorded.get(file) != current.get(file)
    ]
    if changes:
        raise DataError(
            "; ".join(changes) + f" (sha256 recorded in {latest.name}). --resume continues training on the data the run "
            f"started with: restore it, or start a new run (another output_dir, or --overwrite)"
        )


def nonfinite_names(params):
    """Names of the trainable parameters holding NaN or infinity."""
    return [name for name, p in params.items() if not bool(torch.isfinite(p.detach()).all())]


def nonfinite_error(state, record, skipped):
    config = state.config
    what = " and ".join(f"{key} {record[key]}" for key in ("loss", "grad_norm") if not math.isfinite(record[key]))
    if state.step == 1:
        cause = (
            "it is not finite before any update, so the model or the data produce it: check the model's weights, "
            "the scale in the method's own options (an adapter's alpha) and train.max_length"
        )
    else:
        cause = (
            f"the likely cause is a learning rate too high for this model (train.lr={config.train.lr:g}: try 10x lower, "
            f"or a warmup with train.warmup_steps), or too large a scale in the method's own options"
        )
    if config.train.on_nonfinite == "skip":
        cause += f"; {skipped} steps were skipped, more than train.max_nonfinite_skips={config.train.max_nonfinite_skips}"
    good = checkpoint.latest_checkpoint(state.output_dir)
    kept = f"the last healthy checkpoint is {good}" if good else "no checkpoint was written (set train.save_every)"
    return NonFiniteError(
        f"step {state.step}: {what}; the optimiser step was not taken and the run stopped. {cause.capitalize()}. "
        f"final/ was not written; {kept}"
    )


def interrupted(signum, state, saved, evaluating=False, result=None):
    during = ", during its evaluation (--resume evaluates again)" if evaluating else ""
    kept = f"; the result is saved in {result}" if result else ""
    return RunInterrupted(
        f"{signal.Signals(signum).name}: stopped after step {state.step} of {state.max_steps}{during}; "
        f"checkpoint written to {saved}{kept}",
        signum,
        step=state.step,
        checkpoint=saved,
    )


def start_or_resume(run, resume_from):
    """Seed a fresh run (and clear its metrics), or restore checkpoint ``resume_from``; then
    record the run's config beside its checkpoints (rank 0)."""
    state, parallel = run.state, run.parallel
    output_dir, config, world = state.output_dir, state.config, state.world
    world.on_main(lambda: checkpoint.remove_temporaries(output_dir))  # this run holds the lock
    record = {}
    if resume_from is not None:
        record = checkpoint.load_checkpoint(
            resume_from,
            run.params,
            run.optimizer,
            run.scheduler,
            load_param=parallel.load_param,
            load_optimizer_state=parallel.load_optimizer_state,
        )
        state.step, state.tokens_seen = record["step"], record["tokens_seen"]
        if world.rank:  # the checkpoint holds rank 0's random state: the others draw apart from it
            torch.manual_seed(config.train.seed + world.rank * 1_000_003 + state.step)
        world.on_main(lambda: _restart_metrics(output_dir / "metrics.jsonl", state.step))
    else:
        # Each rank draws its own dropout masks; rank 0 draws as a single process does.
        torch.manual_seed(config.train.seed + world.rank)
        random.seed(config.train.seed + world.rank)
        world.on_main(lambda: (output_dir / "metrics.jsonl").unlink(missing_ok=True))
    # A resumed run keeps the hashes its data was checked against; older checkpoints had none.
    run.data_sha256 = record.get("data_sha256") or world.on_main(lambda: training_data_hashes(config))
    world.on_main(lambda: checkpoint.atomic_write_text(output_dir / "config.json", json.dumps(dump_config(config), indent=1)))


def optimizer_step(run):
    """One optimiser step over ``train.grad_accum`` micro-batches; return its metrics record.

    Losses are summed over all micro-batches (and all ranks), then the gradients are divided by
    the step's total target count: every target token weighs the same whatever micro-batch, or
    rank, it fell in. A parallel wrapper averages gradients over the ``N`` ranks, so they are
    divided by ``count / N``: the result is what one process computes.
    """
    state, parallel, params = run.state, run.parallel, run.params
    config, pm, world = state.config, state.pm, state.world
    started = time.perf_counter()
    # Datasets.steps_per_batch > 1: consecutive steps train on the same micro-batches.
    first = state.step // run.datasets.steps_per_batch * config.train.grad_accum
    micro = [micro_batch_rows(run.datasets, config, first + i) for i in range(config.train.grad_accum)]
    state.epoch = micro[-1][0]
    loss_sum, count, tokens, metric_sums = 0.0, 0, 0, {}
    for i, (_, examples) in enumerate(micro):
        batch, weight = local_batch(run.datasets, world, examples)
        batch = to_device(batch, state.device)
        # Gradients are synchronised between ranks once per step, on the last micro-batch.
        with parallel.no_sync() if i < len(micro) - 1 else nullcontext():
            with autocast(state):
                out = pm.hook.ftengine_compute_loss(model=parallel.model, batch=batch, state=state)
            (out.loss * weight if weight != 1.0 else out.loss).backward()
        loss_sum, count = loss_sum + weight * float(out.loss.detach()), count + (out.count if weight else 0)
        tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch and weight else 0
        for key, value in out.metrics.items():
            metric_sums[key] = metric_sums.get(key, 0.0) + weight * float(value)
    loss_sum, count, tokens, *values = world.sum([loss_sum, count, tokens, *metric_sums.values()])
    for param in params.values():
        if param.grad is not None:
            param.grad.div_(max(count, 1) / world.size)
    grad_norm = parallel.grad_norm(params.values(), config.train.max_grad_norm)
    loss = loss_sum / max(count, 1)
    lr = run.optimizer.param_groups[0]["lr"]
    # A NaN/inf step never reaches the optimiser: the weights stay those of the last good step.
    skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
    if not skipped:
        run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.tokens_seen += int(tokens)
    elapsed = time.perf_counter() - started
    record = {
        "step": state.step,
        "epoch": state.epoch,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        # Batches without an attention_mask (prompts a loss samples from) count no tokens: None, not 0.
        "tokens_per_s": tokens / elapsed if elapsed and tokens else None,
        "step_time_s": elapsed,
    }
    if skipped:
        record["skipped"] = "nonfinite"
    return record | {k: v / max(count, 1) for k, v in zip(metric_sums, values)}


# --------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------


def save(model, tokenizer, config, pm, path):
    """Save the result through the plugins, atomically: ``path`` appears complete or not at all."""
    with checkpoint.atomic_directory(path) as tmp:
        written = adapter_methods(pm).save(model, tokenizer, config, tmp) + [
            f
            for files in pm.hook.ftengine_save_model(model=model, tokenizer=tokenizer, config=config, path=tmp)
            for f in files or ()
        ]
        if not written:
            raise FtengineError("no plugin saved the result: select a method plugin (run 'ftengine plugins' to list them)")
        write_base(tmp, model)  # which base an adapter belongs to, for every adapter plugin
    return path
