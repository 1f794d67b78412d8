"""The training loop: train and save. Read ``train`` top to bottom.

Every step that a method changes (loading, quantising, adapters, data, loss, optimiser,
evaluation, saving) is a hook call (``ftengine.build`` builds the model); this file only orders
them and keeps the books: gradient accumulation, clipping, the schedule, logging, checkpoints
and resume.

A run never loses work: it owns its ``output_dir`` (``ftengine.rundir``); it reads and checks
all data before the model's weights load; ``--resume`` checks the checkpoint's config against
the run's; a step whose loss or gradient norm is NaN/inf never reaches the optimiser
(``train.on_nonfinite``); SIGINT/SIGTERM finish the step and write a checkpoint
(``ftengine.signals``).
"""

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint
from .build import build
from .config import dump_config
from .errors import ConfigError, FtengineError
from .modeling import autocast, eval_mode
from .pluginmanager import nondefault_implementers
from .rundir import claim_output_dir
from .signals import RunInterrupted, StopSignals
from .state import RunState


class NonFiniteError(FtengineError):
    """A step's loss or gradient norm was NaN or infinite and ``train.on_nonfinite`` says stop."""


def lr_lambda(warmup, total, min_ratio):
    """Linear warmup to 1, then cosine decay to ``min_ratio``."""

    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def micro_batch(datasets, config, index):
    """The ``index``-th micro-batch of the run: epochs are seeded shuffles of the train set."""
    per_epoch = math.ceil(len(datasets.train) / config.train.batch_size)
    epoch, position = divmod(index, per_epoch)
    order = torch.randperm(len(datasets.train), generator=torch.Generator().manual_seed(config.train.seed + epoch))
    start = position * config.train.batch_size
    chosen = order[start : start + config.train.batch_size].tolist()
    return epoch, datasets.collate([datasets.train[i] for i in chosen])


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def total_steps(config, n_train):
    if config.train.max_steps:
        return config.train.max_steps
    per_epoch = math.ceil(n_train / config.train.batch_size)
    return max(1, math.ceil((config.train.epochs or 1) * per_epoch / config.train.grad_accum))


@torch.no_grad()
def evaluate(model, tokenizer, datasets, state):
    """Eval loss over ``datasets.eval`` plus every plugin's metrics, as ``eval_*`` keys."""
    pm, config = state.pm, state.config
    record = {}
    with eval_mode(model):
        if datasets.eval:
            loss_sum, count, metric_sums = 0.0, 0, {}
            for start in range(0, len(datasets.eval), config.train.eval_batch_size):
                batch = to_device(datasets.collate(datasets.eval[start : start + config.train.eval_batch_size]), state.device)
                with autocast(state):
                    out = pm.hook.ftengine_compute_loss(model=model, batch=batch, state=state)
                loss_sum, count = loss_sum + float(out.loss.detach()), count + out.count
                for key, value in out.metrics.items():
                    metric_sums[key] = metric_sums.get(key, 0.0) + float(value)
            record["eval_loss"] = loss_sum / max(count, 1)
            record.update({f"eval_{key}": value / max(count, 1) for key, value in metric_sums.items()})
        for metrics in pm.hook.ftengine_eval_metrics(model=model, tokenizer=tokenizer, datasets=datasets, state=state):
            for key, value in (metrics or {}).items():
                if f"eval_{key}" in record:
                    raise FtengineError(f"two plugins return the evaluation metric '{key}': rename one")
                record[f"eval_{key}"] = value
    return record


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def log(state, record, metrics_file):
    """Hand a metrics record to the plugins and append it to ``metrics.jsonl``.

    NaN and infinity become ``null``: JSON has no such numbers, and ``metrics.jsonl`` stays
    readable by any JSON parser.
    """
    record = {key: _finite_or_none(value) for key, value in record.items()}
    state.pm.hook.ftengine_on_log(state=state, record=record)
    metrics_file.write(json.dumps(record, allow_nan=False) + "\n")
    metrics_file.flush()


def _restart_metrics(path, step):
    """Keep the metrics of steps up to ``step`` (a resumed run rewrites what follows)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
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
    with claim_output_dir(output_dir, resume=resume, overwrite=overwrite) as run_dir, StopSignals() as stop:
        if run_dir.moved_to:
            _note(f"--overwrite: the earlier run in {output_dir} was moved to {run_dir.moved_to}")
        return _train(config, pm, output_dir, resume, eval_before, stop)


def _train(config, pm, output_dir, resume, eval_before, stop):
    run = prepare(config, pm, output_dir, resume)
    model, state, train_options = run.model, run.state, config.train
    summary, skipped = {"before": None, "after": None}, 0
    with open(output_dir / "metrics.jsonl", "a") as metrics_file:
        pm.hook.ftengine_on_train_start(model=model, datasets=run.datasets, state=state)
        if eval_before and not resume:
            summary["before"] = {"step": 0, **evaluate(model, run.tokenizer, run.datasets, state)}
            log(state, summary["before"], metrics_file)
        model.train()
        stop.arm("finishing the current step, then saving a checkpoint")
        while state.step < state.max_steps:
            record = optimizer_step(model, run.datasets, state, run.params, run.optimizer, run.scheduler)
            if record.get("skipped"):
                skipped += 1
                if train_options.on_nonfinite == "stop" or skipped > train_options.max_nonfinite_skips:
                    log(state, record, metrics_file)
                    raise nonfinite_error(state, record, skipped)
            if state.step % train_options.log_every == 0 or state.step == state.max_steps or record.get("skipped"):
                log(state, record, metrics_file)
            if train_options.eval_every and state.step % train_options.eval_every == 0 and state.step < state.max_steps:
                log(state, {"step": state.step, **evaluate(model, run.tokenizer, run.datasets, state)}, metrics_file)
            saved = save_checkpoint(run) if train_options.save_every and state.step % train_options.save_every == 0 else None
            pm.hook.ftengine_on_step_end(model=model, state=state)
            if stop.signum:
                raise interrupted(stop, state, saved or save_checkpoint(run))
        stop.arm("finishing the final evaluation and saving the result")
        summary["after"] = {"step": state.step, **evaluate(model, run.tokenizer, run.datasets, state)}
        log(state, summary["after"], metrics_file)
        pm.hook.ftengine_on_train_end(model=model, state=state)

    refuse_nonfinite_result(run)
    summary["saved"] = save(model, run.tokenizer, config, pm, output_dir / "final")
    return summary | {"output_dir": str(output_dir), "build": state.build_info, "data": run.datasets.stats}


@dataclass
class Run:
    """What a training run works with, once prepared."""

    model: torch.nn.Module
    tokenizer: object
    datasets: object
    params: dict  # {name: parameter} of the trainable parameters, in a fixed order
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: RunState


def prepare(config, pm, output_dir, resume):
    """Read the data (before the slow weights), build the model, optimiser and schedule, and
    start afresh or restore the checkpoint ``--resume`` continues."""
    tokenizer = load_tokenizer(config, pm)
    datasets = load_data(config, pm, tokenizer) if tokenizer is not None else None
    resume_from = find_resume_checkpoint(output_dir, config) if resume else None
    model, model_tokenizer, info = build(config, pm)
    tokenizer = tokenizer or model_tokenizer
    datasets = datasets or load_data(config, pm, tokenizer)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ConfigError(
            ["no trainable parameters: the active method plugins selected none (run 'ftengine plugins' to list them)"]
        )
    optimizer = pm.hook.ftengine_make_optimizer(model=model, params=list(params.items()), config=config)
    max_steps = total_steps(config, len(datasets.train))
    schedule = lr_lambda(config.train.warmup_steps, max_steps, config.train.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    device = next(model.parameters()).device
    state = RunState(
        config=config,
        pm=pm,
        output_dir=output_dir,
        device=device,
        autocast_dtype=torch.bfloat16 if device.type == "cuda" else None,
        max_steps=max_steps,
        adapter_name=info["adapter_name"],
        build_info=info,
        data_stats=datasets.stats,
    )
    if config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    start_or_resume(state, params, optimizer, scheduler, resume_from)
    return Run(model, tokenizer, datasets, params, optimizer, scheduler, state)


def save_checkpoint(run):
    """Checkpoint the run at its current step (marked unhealthy if a weight is not finite)."""
    state = run.state
    return checkpoint.save_checkpoint(
        state.output_dir,
        state.step,
        run.params,
        run.optimizer,
        run.scheduler,
        {"tokens_seen": state.tokens_seen},
        healthy=not nonfinite_names(run.params),
        config=dump_config(state.config),
    )


def refuse_nonfinite_result(run):
    bad = nonfinite_names(run.params)
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
    return datasets


def find_resume_checkpoint(output_dir, config):
    """The newest healthy checkpoint, after checking its recorded config against ``config``.

    :raises ConfigError: naming every changed key that changes what is trained.
    """
    latest = checkpoint.latest_checkpoint(output_dir)
    if latest is None:
        raise FtengineError(
            f"{output_dir}: --resume given but no complete checkpoint found in {output_dir / checkpoint.CHECKPOINTS}"
        )
    saved = checkpoint.checkpoint_config(latest)
    if saved is None and (output_dir / "config.json").is_file():  # checkpoints from before config.json
        saved = json.loads((output_dir / "config.json").read_text())
    if saved is None:
        return latest
    errors, accepted = checkpoint.compare_configs(saved, dump_config(config))
    if errors:
        raise ConfigError(
            [f"{key}: {before!r} in {latest.name}, {after!r} now" for key, before, after in errors]
            + [
                f"--resume continues the run {latest} was trained with: put these keys back, or start a new run "
                f"(another output_dir, or --overwrite)"
            ]
        )
    for key, before, after in accepted:
        _note(f"resume: accepted {key}: {before!r} -> {after!r} ({checkpoint.RESUME_SAFE_KEYS[key]})")
    return latest


def _note(message):
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(message, highlight=False)


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


def interrupted(stop, state, saved):
    return RunInterrupted(
        f"{stop.name}: stopped after step {state.step} of {state.max_steps}; checkpoint written to {saved}",
        stop.signum,
        step=state.step,
        checkpoint=saved,
    )


def start_or_resume(state, params, optimizer, scheduler, resume_from):
    """Seed a fresh run (and clear its metrics), or restore checkpoint ``resume_from``; then
    record the run's config beside its checkpoints."""
    output_dir, config = state.output_dir, state.config
    if resume_from is not None:
        record = checkpoint.load_checkpoint(resume_from, params, optimizer, scheduler)
        state.step, state.tokens_seen = record["step"], record["tokens_seen"]
        _restart_metrics(output_dir / "metrics.jsonl", state.step)
    else:
        torch.manual_seed(config.train.seed)
        random.seed(config.train.seed)
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    checkpoint.atomic_write_text(output_dir / "config.json", json.dumps(dump_config(config), indent=1))


def optimizer_step(model, datasets, state, params, optimizer, scheduler):
    """One optimiser step over ``train.grad_accum`` micro-batches; return its metrics record.

    Losses are summed over all micro-batches, then the gradients are divided by the step's total
    target count: every target token weighs the same whatever micro-batch it fell in.
    """
    config, pm = state.config, state.pm
    started = time.perf_counter()
    first = state.step * config.train.grad_accum
    micro = [micro_batch(datasets, config, first + i) for i in range(config.train.grad_accum)]
    state.epoch = micro[-1][0]
    loss_sum, count, tokens, metric_sums = 0.0, 0, 0, {}
    for _, batch in micro:
        batch = to_device(batch, state.device)
        with autocast(state):
            out = pm.hook.ftengine_compute_loss(model=model, batch=batch, state=state)
        out.loss.backward()
        loss_sum, count = loss_sum + float(out.loss.detach()), count + out.count
        tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
        for key, value in out.metrics.items():
            metric_sums[key] = metric_sums.get(key, 0.0) + float(value)
    for param in params.values():
        if param.grad is not None:
            param.grad.div_(max(count, 1))
    if config.train.max_grad_norm:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params.values(), config.train.max_grad_norm))
    else:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params.values(), math.inf))  # the norm only
    loss = loss_sum / max(count, 1)
    lr = optimizer.param_groups[0]["lr"]
    # A NaN/inf step never reaches the optimiser: the weights stay those of the last good step.
    skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
    if not skipped:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.tokens_seen += tokens
    elapsed = time.perf_counter() - started
    record = {
        "step": state.step,
        "epoch": state.epoch,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": tokens / elapsed if elapsed else None,
        "step_time_s": elapsed,
    }
    if skipped:
        record["skipped"] = "nonfinite"
    return record | {k: v / max(count, 1) for k, v in metric_sums.items()}


# --------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------


def save(model, tokenizer, config, pm, path):
    """Save the result through the plugins, atomically: ``path`` appears complete or not at all."""
    with checkpoint.atomic_directory(path) as tmp:
        written = [
            f
            for files in pm.hook.ftengine_save_model(model=model, tokenizer=tokenizer, config=config, path=tmp)
            for f in files or ()
        ]
        if not written:
            raise FtengineError("no plugin saved the result: select a method plugin (run 'ftengine plugins' to list them)")
    return path
