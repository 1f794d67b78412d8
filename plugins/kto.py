"""Kahneman-Tversky Optimisation (Ethayarajh et al. 2024): preference tuning from unpaired rows.

    ftengine run job.yaml --plugin lora --plugin kto -o kto.beta=0.1

Data: JSONL rows ``{"prompt", "completion", "label"}``: a completion that is desirable
(``label: true``) or undesirable (``false``), with no partner. ``prompt`` (or ``messages``) and
``completion`` are strings or chat message lists, rendered and masked as ``dpo`` does.

A micro-batch of ``B`` rows is ``2B`` rows padded together: the rows as given, then the KL rows,
each prompt with the completion of the row before it in the micro-batch (the first with the
last's), as TRL shifts completions by one. The KL estimate is the mean policy/reference
log-ratio of those mismatched completions, detached, over the micro-batch on every process, and
clamped at 0. The reference is ``dpo``'s (``ftengine.plugins.dpo.Reference``): the model with
adapters off, ``kto.init_adapter`` loaded a second time, or a frozen copy under ``full``.

Losses and metrics follow TRL's ``KTOTrainer`` (``docs/kto.md``). The loss and the metrics are
sums over rows (completions) with the number of rows as the count.
"""

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from ftengine import hookimpl
from ftengine.config import Section
from ftengine.data import IGNORE_INDEX, BadRows, Truncation, load_splits, pad_batch, read_rows, require_messages, require_str
from ftengine.errors import DataError, FtengineError
from ftengine.log import warn
from ftengine.plugins.dpo import (
    REFERENCE_ADAPTER,
    Reference,
    _response,
    frozen_copy,
    frozen_reference_problems,
    load_reference_adapter,
    row_logps,
    tokenize_response,
)
from ftengine.state import LossOutput
from pydantic import Field, PositiveFloat

ftengine_plugin_api = 1

UNPAIRED_FORMAT = '{"prompt": "...", "completion": "...", "label": true}'
#: TRL's recommended range (KTO paper, eq. 8) for desirable_weight × desirables over
#: undesirable_weight × undesirables.
WEIGHT_RATIO_RANGE = (1.0, 4 / 3)


class KtoOptions(Section):
    beta: PositiveFloat = Field(0.1, description="how far the policy may move from the reference (TRL's beta)")
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field(
        "kto", description="kto (with the KL estimate) or apo_zero_unpaired (APO-zero, no KL term)"
    )
    desirable_weight: PositiveFloat = Field(1.0, description="weight of the loss of a desirable (label true) row")
    undesirable_weight: PositiveFloat = Field(1.0, description="weight of the loss of an undesirable (label false) row")
    init_adapter: str | None = Field(None, description="PEFT adapter directory to start from (e.g. the SFT adapter)")


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def unpaired_messages(row, where):
    """``(prompt, completion, label)`` of an unpaired row; the messages as ``dpo`` reads them."""
    if row.get("label") is None:
        raise DataError(f"{where}: missing field 'label' (true for a desirable completion, false for an undesirable one)")
    if not isinstance(row["label"], bool):
        raise DataError(
            f"{where}: field 'label' must be true (desirable) or false (undesirable), got {row['label']!r} "
            f"({type(row['label']).__name__})"
        )
    key = "messages" if row.get("messages") is not None else "prompt"
    if isinstance(row.get(key), list):
        return require_messages(row[key], key, where), _response(row, "completion", where), row["label"]
    prompt = require_str(row, "prompt", where, allow_empty=True)
    completion = require_str(row, "completion", where)
    return [{"role": "user", "content": prompt}], [{"role": "assistant", "content": completion}], row["label"]


def _check_not_other_format(row, where):
    keys = sorted(k for k, v in row.items() if v is not None)
    if row.get("completion") is not None:
        return
    if row.get("chosen") is not None or row.get("rejected") is not None:
        raise DataError(
            f"{where}: the kto plugin expects unpaired rows {UNPAIRED_FORMAT}; this row is a preference pair "
            f"(keys {keys}). Train on it with --plugin dpo, or write each answer as its own row with its label"
        )
    if row.get("response") is not None:
        raise DataError(
            f"{where}: the kto plugin expects unpaired rows {UNPAIRED_FORMAT}; this row looks like SFT data "
            f"(keys {keys}). Train on it without --plugin kto, or rename 'response' to 'completion' and add a 'label'"
        )


def load_unpaired_file(path, tokenizer, max_length, split, options=None):
    """Tokenise unpaired rows (any source ``read_rows`` reads); return ``(examples, stats)``.

    Each example keeps where its completion starts (``prompt_length``), so a batch can pair its
    prompt with another row's completion. Bad rows are reported together.
    """
    examples, truncation, bad = [], Truncation(max_length), BadRows(path)
    for row, where in read_rows(path, options, expected=UNPAIRED_FORMAT):
        sequence = None
        with bad.check():
            _check_not_other_format(row, where)
            prompt, completion, label = unpaired_messages(row, where)
            sequence = truncation.cut([tokenize_response(tokenizer, prompt, completion, "completion", where)])
        if sequence is None:
            continue
        ((ids, labels),) = sequence
        examples.append(
            {
                "input_ids": ids,
                "labels": labels,
                # The assistant header belongs to the prompt side, as TRL's generation prompt does.
                "prompt_length": next(i for i, label in enumerate(labels) if label != IGNORE_INDEX),
                "label": label,
                "index": len(examples),
                "split": split,
                "source": where,
                "row": {"messages": prompt + completion, "label": label},
            }
        )
    bad.raise_if_any()
    return examples, truncation.stats(kept=len(examples))


def mismatched_rows(examples, max_length):
    """``(ids, labels)`` of each example's prompt followed by the completion of the example
    before it (the first takes the last's): TRL's KL completions, cut to ``max_length``."""
    rows = []
    for example, other in zip(examples, examples[-1:] + examples[:-1]):
        prompt, start = example["input_ids"][: example["prompt_length"]], other["prompt_length"]
        ids = prompt + other["input_ids"][start:]
        labels = [IGNORE_INDEX] * len(prompt) + other["labels"][start:]
        rows.append((ids[:max_length], labels[:max_length]))
    return rows


def collate_unpaired(examples, pad_token_id, max_length, with_kl):
    """One batch: the ``B`` rows, then (``with_kl`` and ``B`` > 1) their ``B`` KL rows, padded
    together; ``label`` holds the ``B`` labels. A single row has no other completion to pair
    its prompt with, so it gets no KL row."""
    rows = [(e["input_ids"], e["labels"]) for e in examples]
    if with_kl and len(examples) > 1:
        rows += mismatched_rows(examples, max_length)
    return {
        "input_ids": pad_batch([ids for ids, _ in rows], pad_token_id),
        "attention_mask": pad_batch([[1] * len(ids) for ids, _ in rows], 0),
        "labels": pad_batch([labels for _, labels in rows], IGNORE_INDEX),
        "label": torch.tensor([e["label"] for e in examples], dtype=torch.bool),
        "index": torch.tensor([e["index"] for e in examples]),
        "split": examples[0]["split"],
    }


def check_both_labels(examples, source, options):
    """Refuse training data with one label class; warn, as TRL does, when the weights do not
    balance the classes (desirable_weight × desirables over undesirable_weight × undesirables
    outside [1, 4/3])."""
    desirable = sum(e["label"] for e in examples)
    undesirable = len(examples) - desirable
    if examples and not (desirable and undesirable):
        present, missing = ("true", "false (undesirable)") if desirable else ("false", "true (desirable)")
        raise DataError(
            f"{source}: every row has label {present}; there is no row with label {missing}. KTO needs both: it raises "
            f"desirable completions above the reference and lowers undesirable ones, each against the KL estimate, and "
            f"with one class alone the loss only pushes one way. Add rows of the missing class (or, with desirable rows "
            f"alone, train SFT: drop --plugin kto)"
        )
    if not examples:
        return
    ratio = options.desirable_weight * desirable / (options.undesirable_weight * undesirable)
    low, high = WEIGHT_RATIO_RANGE
    if not low <= ratio <= high:
        balanced = undesirable * options.undesirable_weight / desirable
        warn(
            f"kto: {desirable} desirable and {undesirable} undesirable rows in {source}; desirable_weight × desirables "
            f"over undesirable_weight × undesirables is {ratio:.2f}, outside TRL's recommended [1, 4/3]: set "
            f"kto.desirable_weight in [{balanced * low:.2f}, {balanced * high:.2f}] (or undesirable_weight to match)"
        )


def load_unpaired(config, tokenizer):
    options, max_length = config.kto, config.train.max_length
    datasets = load_splits(
        config,
        lambda path, split: load_unpaired_file(path, tokenizer, max_length, split, config.data),
        lambda examples: collate_unpaired(examples, tokenizer.pad_token_id, max_length, options.loss_type == "kto"),
    )
    check_both_labels(datasets.train, config.data.train, options)
    return datasets


# --------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------


def rows_of(batch, part, size):
    """Rows ``part * size`` to ``(part + 1) * size`` of a batch (the given rows or the KL rows)."""
    rows = slice(part * size, (part + 1) * size)
    return {key: batch[key][rows] for key in ("input_ids", "attention_mask", "labels")}


def kl_estimate(policy_kl, reference_kl, world):
    """TRL's KL term: the mean log-ratio of the mismatched completions over every process's
    micro-batch (``world.sum``, one collective on each), clamped at 0; no gradient."""
    total, count = world.sum([float((policy_kl - reference_kl).sum()), len(policy_kl)])
    return max(total / count, 0.0) if count else 0.0


def unpaired_losses(options, logratios, labels, kl):
    """Per-row weighted losses from the policy/reference log-ratios of the completions."""
    beta = options.beta
    if options.loss_type == "kto":  # KTO paper, eq. 7
        desirable, undesirable = 1 - F.sigmoid(beta * (logratios - kl)), 1 - F.sigmoid(beta * (kl - logratios))
    else:  # APO-zero, unpaired
        desirable, undesirable = 1 - F.sigmoid(beta * logratios), F.sigmoid(beta * logratios)
    return torch.where(labels, options.desirable_weight * desirable, options.undesirable_weight * undesirable)


def unpaired_metrics(options, policy, reference, labels, kl):
    """Sums over rows, per class, and the class counts: ``rewards_chosen_sum / count_chosen`` is
    TRL's ``rewards/chosen`` (the ratio of two logged values is exact over steps and processes)."""
    rewards = options.beta * (policy - reference).detach()
    policy = policy.detach()
    return {
        "rewards_chosen_sum": float(rewards[labels].sum()),
        "rewards_rejected_sum": float(rewards[~labels].sum()),
        "logps_chosen_sum": float(policy[labels].sum()),
        "logps_rejected_sum": float(policy[~labels].sum()),
        "count_chosen": int(labels.sum()),
        "count_rejected": int((~labels).sum()),
        "kl": kl * len(labels),
    }


# --------------------------------------------------------------------------------------------
# hooks
# --------------------------------------------------------------------------------------------


@hookimpl
def ftengine_config_section(register):
    register("kto", KtoOptions)


@hookimpl
def ftengine_validate(config, active):
    options, problems = config.kto, frozen_reference_problems(active, "kto", "KTO")
    if any(config.data.fields.model_dump().values()):
        problems.append(
            "data.fields: the kto plugin reads unpaired rows (prompt/messages, completion, label) by these names; "
            "rename the columns in the data, or remove data.fields"
        )
    if config.train.packing:
        problems.append(
            "train.packing: the kto plugin scores each completion, and each prompt with another row's completion, as "
            "whole padded rows; packing is not supported with kto: set train.packing: false"
        )
    if options.loss_type == "kto" and config.train.batch_size < 2:
        problems.append(
            "train.batch_size: kto estimates its KL term from each prompt paired with another row's completion in the "
            "same micro-batch, which needs at least 2 rows (with 1 the estimate is the row's own reward); set "
            "train.batch_size to 2 or more (8 or more gives a steadier estimate), or kto.loss_type: apo_zero_unpaired"
        )
    if options.init_adapter is not None and not (Path(options.init_adapter) / "adapter_config.json").is_file():
        problems.append(
            f"kto.init_adapter: {options.init_adapter} holds no adapter_config.json; point it at a saved adapter "
            f"(e.g. <sft output_dir>/final)"
        )
    return problems


@hookimpl
def ftengine_load_dataset(config, tokenizer):
    return load_unpaired(config, tokenizer)


@hookimpl
def ftengine_on_train_start(model, state):
    full = state.adapter_name is None  # the method trains the model's own weights: no adapter to switch off
    reference = Reference(state.pm, state.adapter_name)
    if state.config.kto.init_adapter is not None:
        if full:
            raise FtengineError(
                "kto.init_adapter: this method trains no adapter to start from; set model: to the SFT model directory instead"
            )
        load_reference_adapter(model, state, "kto.init_adapter")
        reference.adapter = REFERENCE_ADAPTER
    elif full:
        reference.frozen = frozen_copy(model, state)
    state.plugin_data["kto"] = reference


@hookimpl
def ftengine_compute_loss(model, batch, state):
    options, labels = state.config.kto, batch["label"]
    if "kto" not in state.plugin_data:
        raise FtengineError("kto: no reference model: ftengine_on_train_start must run before the first loss")
    reference = state.plugin_data["kto"].compute(model, batch, score=row_logps)
    size = len(labels)
    policy = row_logps(model, rows_of(batch, 0, size))
    kl = 0.0
    if options.loss_type == "kto":
        with_kl = len(reference) > size
        with torch.no_grad():
            policy_kl = row_logps(model, rows_of(batch, 1, size)) if with_kl else policy[:0]
        kl = kl_estimate(policy_kl, reference[size:], state.world)
    losses = unpaired_losses(options, policy - reference[:size], labels, kl)
    return LossOutput(loss=losses.sum(), count=size, metrics=unpaired_metrics(options, policy, reference[:size], labels, kl))
