"""The training loop: train and save. Read ``train`` top to bottom.

Every step that a method changes (loading, quantising, adapters, data, loss, optimiser,
evaluation, saving) is a hook call (``ftengine.build`` builds the model); this file only orders
them and keeps the books: gradient accumulation, clipping, the schedule, logging, checkpoints
and resume.
"""

import json
import math
import random
import time
from pathlib import Path

import torch

from . import checkpoint
from .build import build
from .config import dump_config
from .errors import ConfigError, FtengineError
from .modeling import autocast, eval_mode
from .state import RunState


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


def log(state, record, metrics_file):
    """Hand a metrics record to the plugins and append it to ``metrics.jsonl``."""
    state.pm.hook.ftengine_on_log(state=state, record=record)
    metrics_file.write(json.dumps(record) + "\n")
    metrics_file.flush()


def _restart_metrics(path, step):
    """Keep the metrics of steps up to ``step`` (a resumed run rewrites what follows)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    checkpoint.atomic_write_text(path, "".join(line + "\n" for line in kept))


def train(config, pm, resume=False, eval_before=False):
    """Run a whole training job; return a summary dict.

    :param resume: continue from the newest complete checkpoint in ``config.output_dir``.
    :param eval_before: evaluate the model before the first step too (the before/after table).
    """
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer, info = build(config, pm)
    datasets = pm.hook.ftengine_load_dataset(config=config, tokenizer=tokenizer)
    if not datasets.train:
        raise FtengineError(f"{config.data.train}: no training example left after truncation (raise train.max_length)")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ConfigError(
            ["no trainable parameters: the active method plugins selected none (run 'ftengine plugins' to list them)"]
        )
    optimizer = pm.hook.ftengine_make_optimizer(model=model, params=list(params.items()), config=config)
    max_steps = total_steps(config, len(datasets.train))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.train.warmup_steps, max_steps, config.train.min_lr_ratio)
    )
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
    start_or_resume(state, params, optimizer, scheduler, resume)

    summary = {"before": None, "after": None}
    with open(output_dir / "metrics.jsonl", "a") as metrics_file:
        pm.hook.ftengine_on_train_start(model=model, datasets=datasets, state=state)
        if eval_before and not resume:
            summary["before"] = {"step": 0, **evaluate(model, tokenizer, datasets, state)}
            log(state, summary["before"], metrics_file)
        model.train()
        while state.step < max_steps:
            record = optimizer_step(model, datasets, state, params, optimizer, scheduler)
            if state.step % config.train.log_every == 0 or state.step == max_steps:
                log(state, record, metrics_file)
            if config.train.eval_every and state.step % config.train.eval_every == 0 and state.step < max_steps:
                log(state, {"step": state.step, **evaluate(model, tokenizer, datasets, state)}, metrics_file)
            if config.train.save_every and state.step % config.train.save_every == 0:
                checkpoint.save_checkpoint(
                    output_dir, state.step, params, optimizer, scheduler, {"tokens_seen": state.tokens_seen}
                )
            pm.hook.ftengine_on_step_end(model=model, state=state)
        summary["after"] = {"step": state.step, **evaluate(model, tokenizer, datasets, state)}
        log(state, summary["after"], metrics_file)
        pm.hook.ftengine_on_train_end(model=model, state=state)

    summary["saved"] = save(model, tokenizer, config, pm, output_dir / "final")
    summary["output_dir"] = str(output_dir)
    summary["build"] = info
    summary["data"] = datasets.stats
    return summary


def start_or_resume(state, params, optimizer, scheduler, resume):
    """Seed a fresh run (and clear its metrics), or restore the newest complete checkpoint; then
    record the run's config beside its checkpoints."""
    output_dir, config = state.output_dir, state.config
    if resume:
        latest = checkpoint.checkpoint_dirs(output_dir)
        if not latest:
            raise FtengineError(
                f"{output_dir}: --resume given but no complete checkpoint found in {output_dir / checkpoint.CHECKPOINTS}"
            )
        record = checkpoint.load_checkpoint(latest[-1], params, optimizer, scheduler)
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
    grad_norm = None
    if config.train.max_grad_norm:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params.values(), config.train.max_grad_norm))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.tokens_seen += tokens
    elapsed = time.perf_counter() - started
    record = {
        "step": state.step,
        "epoch": state.epoch,
        "loss": loss_sum / max(count, 1),
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": tokens / elapsed if elapsed else None,
        "step_time_s": elapsed,
    }
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
