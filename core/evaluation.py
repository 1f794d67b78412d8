"""Evaluation: the eval loss and every plugin's metrics, on each evaluation set, and the
prompting baselines a fine-tuned model is compared with.

Evaluation sets: ``data.eval`` (metrics ``eval_<metric>``) and each ``data.eval_sets`` entry
(``eval_<name>_<metric>``), e.g. rows phrased unlike the training rows next to rows drawn like
them. ``ftengine_eval_metrics`` is called once per set; ``datasets.eval_name`` says which
(``None`` for ``data.eval``), so a metric that does not depend on the eval rows (a drift check)
is computed once.

Baselines (``eval.baselines``), evaluated before the first step of a fresh run, with the
run's adapters turned off (``activate(None)`` on the adapter methods), so they score the base
model:

* ``zero_shot``: the whole evaluation (loss and metrics) of the base model as is;
* ``few_shot``: the metrics of the plugins that support it (their ``ftengine_eval_metrics``
  takes ``shots``) with ``eval.few_shot_k`` training examples, seeded, placed before every
  prompt: the cheapest adaptation there is, and what it costs in prompt tokens per request.
"""

import time
from contextlib import contextmanager
from dataclasses import replace

import torch

from .data import field_names, row_to_messages
from .distributed import local_batch
from .errors import DataError, FtengineError
from .methods import adapter_methods
from .modeling import autocast, eval_mode, to_device


@torch.no_grad()
def evaluate(model, tokenizer, datasets, state, shots=None):
    """Eval loss over every evaluation set plus every plugin's metrics, as ``eval_*`` keys, and
    the seconds it took (``eval_time_s``).

    A stop signal during a training run cuts it short between two batches: ``state.check_stop``
    raises ``StopRequested``.

    On several processes each eval batch is split between the ranks and the sums are added
    up; ``ftengine_eval_metrics`` runs on every rank over the whole eval set (generation then
    runs in step on every rank, whatever lengths it reaches) and rank 0's values are kept.

    :param shots: few-shot conversations for the plugins that take them; the loss is then not
        computed (the loss of the eval rows with examples before them means nothing here).
    """
    started = time.perf_counter()
    # Evaluating draws none of the training's random numbers: a run resumed at an evaluation
    # step trains exactly as one that never stopped, whatever the evaluation consumed.
    devices = [state.device] if state.device.type == "cuda" else []
    with eval_mode(model), torch.random.fork_rng(devices=devices):
        record = _evaluate_set(model, tokenizer, datasets, state, shots)
        for name, examples in datasets.eval_sets.items():
            scores = _evaluate_set(model, tokenizer, replace(datasets, eval=examples, eval_name=name), state, shots)
            record.update({f"eval_{name}_{key.removeprefix('eval_')}": value for key, value in scores.items()})
    return state.world.broadcast(record | {"eval_time_s": time.perf_counter() - started})


def _evaluate_set(model, tokenizer, datasets, state, shots):
    record = {} if shots is not None else _eval_loss(model, datasets, state)
    state.check_stop()  # before the metric plugins, which may generate for long
    for metrics in _metric_hooks(state.pm, few_shot=shots is not None)(
        model=model, tokenizer=tokenizer, datasets=datasets, state=state, shots=shots
    ):
        for key, value in (metrics or {}).items():
            if f"eval_{key}" in record:
                raise FtengineError(f"two plugins return the evaluation metric '{key}': rename one")
            record[f"eval_{key}"] = value
    return record


def _eval_loss(model, datasets, state):
    if not datasets.eval:
        return {}
    pm, world, size = state.pm, state.world, state.config.train.eval_batch_size
    loss_sum, count, metric_sums = 0.0, 0, {}
    for start in range(0, len(datasets.eval), size):
        state.check_stop()
        batch, weight = local_batch(datasets, world, datasets.eval[start : start + size])
        with autocast(state):
            out = pm.hook.ftengine_compute_loss(model=model, batch=to_device(batch, state.device), state=state)
        loss_sum, count = loss_sum + weight * float(out.loss.detach()), count + (out.count if weight else 0)
        for key, value in out.metrics.items():
            metric_sums[key] = metric_sums.get(key, 0.0) + weight * float(value)
    loss_sum, count, *values = world.sum([loss_sum, count, *metric_sums.values()])
    if not count:  # a loss that scores nothing in evaluation (a count of 0) logs no eval loss
        return {}
    return {"eval_loss": loss_sum / max(count, 1)} | {f"eval_{k}": v / max(count, 1) for k, v in zip(metric_sums, values)}


def few_shot_plugins(pm):
    """Names of the active plugins whose ``ftengine_eval_metrics`` takes ``shots``."""
    return [impl.plugin_name for impl in pm.hook.ftengine_eval_metrics.get_hookimpls() if "shots" in impl.argnames]


def _metric_hooks(pm, few_shot):
    if not few_shot:
        return pm.hook.ftengine_eval_metrics
    others = [impl.plugin for impl in pm.hook.ftengine_eval_metrics.get_hookimpls() if "shots" not in impl.argnames]
    return pm.subset_hook_caller("ftengine_eval_metrics", remove_plugins=others)


def baseline_problems(config, pm):
    """Config problems of ``eval.baselines`` (checked with the rest of the config)."""
    if "few_shot" not in config.eval.baselines or few_shot_plugins(pm):
        return []
    evaluating = [impl.plugin_name for impl in pm.hook.ftengine_eval_metrics.get_hookimpls()]
    return [
        "eval.baselines: few_shot needs a task plugin that supports baselines (its ftengine_eval_metrics takes "
        f"'shots'); the active plugins with metrics ({', '.join(evaluating) or 'none'}) do not: remove few_shot, "
        "or add such a plugin (docs/evaluation.md)"
    ]


def few_shot_examples(datasets, config):
    """``eval.few_shot_k`` training conversations, drawn with ``train.seed``: the examples the
    ``few_shot`` baseline puts before every prompt."""
    # A packed training row keeps the rows and sources of the examples in it.
    rows = [
        (row, where)
        for e in datasets.train
        for row, where in zip(e.get("rows", [e.get("row")]), e.get("sources", [e.get("source")]))
    ]
    k = config.eval.few_shot_k
    if k > len(rows):
        raise DataError(
            f"eval.few_shot_k={k} is more than the {len(rows)} training examples of {config.data.train}: lower eval.few_shot_k"
        )
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(config.train.seed)).tolist()
    return [row_to_messages(rows[i][0], rows[i][1] or f"train[{i}]", field_names(config.data.fields)) for i in order[:k]]


@contextmanager
def adapters_off(model, state):
    """The base model for the block: every adapter turned off, the trained one back after."""
    methods = adapter_methods(state.pm)
    methods.activate(model, None)
    try:
        yield
    finally:
        methods.activate(model, state.adapter_name)


def evaluate_baselines(model, tokenizer, datasets, state):
    """``{label: record}`` for each of ``eval.baselines``, in order, on the first
    ``eval.baseline_rows`` rows of each set (``few_shot`` records carry ``shots``, the number
    of examples in the prompt)."""
    options, results = state.config.eval, {}
    if options.baseline_rows:
        datasets = replace(
            datasets,
            eval=datasets.eval[: options.baseline_rows],
            eval_sets={name: rows[: options.baseline_rows] for name, rows in datasets.eval_sets.items()},
        )
    with adapters_off(model, state):
        for baseline in options.baselines:
            if baseline == "zero_shot":
                results[baseline] = evaluate(model, tokenizer, datasets, state)
            else:
                shots = few_shot_examples(datasets, state.config)
                results[baseline] = {"shots": len(shots), **evaluate(model, tokenizer, datasets, state, shots=shots)}
    return results
