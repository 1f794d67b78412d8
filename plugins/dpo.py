"""Direct Preference Optimisation (Rafailov et al. 2023), with the IPO, hinge and robust losses.

    ftengine run job.yaml --plugin lora --plugin dpo -o dpo.beta=0.1

Data: JSONL rows ``{"prompt", "chosen", "rejected"}`` of strings, or chat rows whose
``prompt`` (or ``messages``), ``chosen`` and ``rejected`` are lists of messages. Each pair is
rendered with the chat template as prompt+chosen and prompt+rejected; the log-probability of a
response is summed over its own tokens only (the assistant turns after the prompt).

Every micro-batch is one forward pass over ``[chosen rows; rejected rows]`` (``2B`` rows
padded together). The reference model is never a second copy when an adapter plugin trains:

* adapters (lora, dora, qlora, prompt_tuning): the same model with its adapters switched off
  (``activate(None)`` on the adapter methods), or, with ``dpo.init_adapter``, with the starting
  adapter loaded a second time, frozen, under the name ``dpo_reference`` (as TRL does);
* ``full``: a frozen copy made when training starts (reloaded from ``model`` on resume, as the
  trained weights are no reference);
* ``dpo.precompute_ref``: reference log-probs computed once before the first step over the
  train and eval pairs, saved to ``<output_dir>/ref_logps.safetensors`` (reused on resume) and
  looked up by example index, so training runs no reference forward at all.

Losses and metrics follow TRL's ``DPOTrainer`` (``docs/dpo.md``). The loss and the metrics are
sums over pairs with the number of pairs as the count.
"""

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from ftengine import hookimpl
from ftengine.checkpoint import atomic_save_safetensors
from ftengine.config import Section
from ftengine.data import (
    IGNORE_INDEX,
    BadRows,
    Truncation,
    load_splits,
    pad_batch,
    read_rows,
    render_chat,
    require_messages,
    require_str,
    tokenize_with_mask,
)
from ftengine.errors import AdapterError, DataError, FtengineError
from ftengine.methods import adapter_methods
from ftengine.modeling import autocast, eval_mode, target_logits, to_device
from ftengine.pluginmanager import plugin_attribute
from ftengine.state import LossOutput
from pydantic import Field, PositiveFloat
from safetensors import safe_open

REFERENCE_ADAPTER = "dpo_reference"
REF_LOGPS_FILE = "ref_logps.safetensors"
SMOOTHED_LOSSES = ("sigmoid", "robust")
PREFERENCE_FORMAT = '{"prompt": "...", "chosen": "...", "rejected": "..."}'


class DpoOptions(Section):
    beta: PositiveFloat = Field(0.1, description="how far the policy may move from the reference (IPO: its tau)")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field("sigmoid", description="sigmoid = DPO")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="assumed chance a preference is flipped (sigmoid: conservative DPO; robust)"
    )
    precompute_ref: bool = Field(False, description="compute reference log-probs once before training")
    init_adapter: str | None = Field(None, description="PEFT adapter directory to start from (e.g. the SFT adapter)")


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def _response(row, field, where):
    if row.get(field) is None:
        raise DataError(f"{where}: missing field '{field}'")
    messages = require_messages(row[field], field, where)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: '{field}' has no assistant turn to score")
    return messages


def pair_messages(row, where):
    """``(prompt, chosen, rejected)`` message lists of a preference row."""
    key = "messages" if row.get("messages") is not None else "prompt"
    if isinstance(row.get(key), list):
        prompt = require_messages(row[key], key, where)
        return prompt, _response(row, "chosen", where), _response(row, "rejected", where)
    prompt = require_str(row, "prompt", where, allow_empty=True)
    chosen, rejected = require_str(row, "chosen", where), require_str(row, "rejected", where)
    user = [{"role": "user", "content": prompt}]
    return user, [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]


def tokenize_response(tokenizer, prompt, response, field, where):
    """Token ids of prompt+response and labels that keep only the response's assistant turns."""
    text, spans = render_chat(tokenizer, prompt + response, where)
    prompt_turns = sum(m["role"] == "assistant" for m in prompt)
    ids, labels = tokenize_with_mask(tokenizer, text, spans[prompt_turns:])
    if all(label == IGNORE_INDEX for label in labels):
        raise DataError(f"{where}: field '{field}' is empty after tokenisation")
    return ids, labels


def load_preference_file(path, tokenizer, max_length, split, options=None, plugin="dpo"):
    """Tokenise preference data (any source ``read_rows`` reads); return ``(examples, stats)``.

    Sequences longer than ``max_length`` keep their start (as TRL's ``keep_start``); a pair
    whose chosen or rejected response is cut off entirely is dropped. Both are counted. Bad
    rows are reported together (``ftengine.data.BadRows``).

    :param options: the ``data`` config section (split, subset, limit).
    :param plugin: the plugin reading the pairs, named in the message for SFT rows.
    """
    examples, truncation, bad = [], Truncation(max_length), BadRows(path)
    for row, where in read_rows(path, options, expected=PREFERENCE_FORMAT):
        sides = None
        with bad.check():
            sides = _tokenize_pair(row, where, tokenizer, truncation, plugin)
        if sides is None:
            continue
        prompt, chosen, _ = pair_messages(row, where)
        (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = sides
        examples.append(
            {
                "chosen_ids": chosen_ids,
                "chosen_labels": chosen_labels,
                "rejected_ids": rejected_ids,
                "rejected_labels": rejected_labels,
                "index": len(examples),
                "split": split,
                "source": where,
                # A chat row ending with the preferred answer, for generation-based metrics.
                "row": {"messages": prompt + chosen},
            }
        )
    bad.raise_if_any()
    return examples, truncation.stats(kept=len(examples))


def _tokenize_pair(row, where, tokenizer, truncation, plugin):
    """The (possibly cut) chosen and rejected ``(ids, labels)`` of a row, or ``None`` if dropped."""
    if row.get("chosen") is None and row.get("rejected") is None and (row.get("response") or row.get("messages")) is not None:
        keys = sorted(k for k, v in row.items() if v is not None)
        raise DataError(
            f"{where}: the {plugin} plugin expects preference rows {PREFERENCE_FORMAT}; this row looks like SFT "
            f"data (keys {keys}). Train on it without --plugin {plugin}, or give preference pairs"
        )
    prompt, chosen, rejected = pair_messages(row, where)
    return truncation.cut(
        [
            tokenize_response(tokenizer, prompt, chosen, "chosen", where),
            tokenize_response(tokenizer, prompt, rejected, "rejected", where),
        ]
    )


def collate_pairs(examples, pad_token_id):
    """One batch of ``2B`` rows: the chosen sequences, then the rejected ones, padded together."""
    ids = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    labels = [e["chosen_labels"] for e in examples] + [e["rejected_labels"] for e in examples]
    return {
        "input_ids": pad_batch(ids, pad_token_id),
        "attention_mask": pad_batch([[1] * len(s) for s in ids], 0),
        "labels": pad_batch(labels, IGNORE_INDEX),
        "index": torch.tensor([e["index"] for e in examples]),
        "split": examples[0]["split"],
    }


def load_preferences(config, tokenizer, plugin="dpo"):
    return load_splits(
        config,
        lambda path, split: load_preference_file(path, tokenizer, config.train.max_length, split, config.data, plugin),
        lambda examples: collate_pairs(examples, tokenizer.pad_token_id),
        length=lambda pair: max(len(pair["chosen_ids"]), len(pair["rejected_ids"])),
    )


def pair_data_problems(config, plugin, why_whole_rows):
    """What a plugin reading preference pairs cannot honour: renamed columns and packing."""
    problems = []
    if any(config.data.fields.model_dump().values()):
        problems.append(
            f"data.fields: the {plugin} plugin reads preference rows (prompt/messages, chosen, rejected) by these names; "
            "rename the columns in the data, or remove data.fields"
        )
    if config.train.packing:
        problems.append(
            f"train.packing: the {plugin} plugin scores each chosen/rejected pair as whole padded rows ({why_whole_rows}); "
            f"packing is not supported with {plugin}: set train.packing: false"
        )
    return problems


# --------------------------------------------------------------------------------------------
# log-probabilities and losses
# --------------------------------------------------------------------------------------------


def row_logps(model, batch):
    """Per row of ``batch``, in one forward pass, the summed log-probability of the labelled
    (response) tokens given what precedes them."""
    logits, targets = target_logits(model, batch)
    token_nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return -token_nll.sum(dim=1)


def sequence_logps(model, batch):
    """``(chosen, rejected)``: ``row_logps`` of a pair batch, split into its two halves."""
    return row_logps(model, batch).chunk(2)


def pair_losses(options, chosen_logratios, rejected_logratios, chosen_tokens, rejected_tokens):
    """Per-pair losses from the policy/reference log-ratios of the chosen and rejected responses.

    ``chosen_tokens``/``rejected_tokens`` (response lengths) are used by IPO only, which, as
    TRL does, compares log-ratios averaged per token.
    """
    beta, smoothing = options.beta, options.label_smoothing
    delta = chosen_logratios - rejected_logratios
    if options.loss_type == "sigmoid":
        # Conservative DPO: the preference is right with probability 1 - smoothing.
        return -(1 - smoothing) * F.logsigmoid(beta * delta) - smoothing * F.logsigmoid(-beta * delta)
    if options.loss_type == "robust":
        # Chowdhury et al. 2024: an unbiased loss under label noise of rate `smoothing`.
        return (-(1 - smoothing) * F.logsigmoid(beta * delta) + smoothing * F.logsigmoid(-beta * delta)) / (1 - 2 * smoothing)
    if options.loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    # IPO (Azar et al. 2023, eq. 17) with beta as tau.
    per_token = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
    return (per_token - 1 / (2 * beta)) ** 2


def pair_metrics(options, policy, reference):
    """Sums over pairs of the implicit rewards ``beta * (log pi - log ref)`` and their margin."""
    chosen = options.beta * (policy[0] - reference[0]).detach()
    rejected = options.beta * (policy[1] - reference[1]).detach()
    return {
        "rewards_chosen": float(chosen.sum()),
        "rewards_rejected": float(rejected.sum()),
        "reward_margin": float((chosen - rejected).sum()),
        "reward_accuracy": float((chosen > rejected).sum()),
        "logps_chosen": float(policy[0].detach().sum()),
        "logps_rejected": float(policy[1].detach().sum()),
    }


# --------------------------------------------------------------------------------------------
# the reference model
# --------------------------------------------------------------------------------------------


@dataclass
class Reference:
    """Where reference log-probs come from, in order: the cache, a frozen copy, or the model
    itself with adapter ``adapter`` active (``None``: adapters off) instead of the trained one."""

    pm: object
    trained_adapter: str
    adapter: str | None = None
    frozen: torch.nn.Module | None = None
    cache: dict | None = None

    @torch.no_grad()
    def compute(self, model, batch, score=sequence_logps):
        """``score(reference, batch)``: by default the pair log-probs; ``row_logps`` gives one
        log-prob per row, for batches that are not pairs (KTO's)."""
        if self.frozen is not None:
            return score(self.frozen, batch)
        adapter_methods(self.pm).activate(model, self.adapter)
        try:
            with eval_mode(model):
                return score(model, batch)
        finally:
            adapter_methods(self.pm).activate(model, self.trained_adapter)

    def logps(self, model, batch):
        if self.cache is None:
            return self.compute(model, batch)
        return self.cache[batch["split"]][batch["index"].cpu()].to(batch["input_ids"].device).unbind(1)


def frozen_reference_problems(active, plugin, method):
    """The config problem of a loss whose reference under ``full`` is ``frozen_copy``, which a
    sharding plugin (``fsdp``) makes impossible."""
    sharding = sorted(name for name in active if plugin_attribute(name, "shards_parameters", False))
    if "full" not in active or not sharding:
        return []
    return [
        f"plugins '{plugin}', 'full' and '{sharding[0]}': {method}'s reference for full fine-tuning is a frozen copy of the "
        f"model, which cannot be copied once sharded; use --plugin ddp, or an adapter method (lora) with {sharding[0]}"
    ]


def frozen_copy(model, state):
    """The full fine-tuning reference: the model as it starts, frozen. On resume the model
    already holds trained weights, so the original is reloaded through the model loader."""
    if state.step == 0:
        reference = copy.deepcopy(model)
    else:
        reference, _ = state.pm.hook.ftengine_load_model(config=state.config)
        reference.to(state.device)
    reference.requires_grad_(False)
    return reference.eval()


def load_reference_adapter(model, state, option="dpo.init_adapter"):
    """Load the adapter that ``option`` (``section.key``) names a second time, frozen, as the
    reference adapter; on a fresh run also copy it into the trained adapter, which therefore
    starts from it."""
    config, pm = state.config, state.pm
    section, key = option.split(".")
    path = Path(getattr(getattr(config, section), key))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    methods = adapter_methods(pm)
    try:
        loaded = methods.load(model, path, REFERENCE_ADAPTER, config)
    except AdapterError as exc:
        raise FtengineError(f"{option}: {exc}") from None
    if loaded is not model:
        raise FtengineError(
            f"{option}: loading {path} replaced the model; the method plugin must load adapters into the model in place"
        )
    trained = state.adapter_name
    # Loading may make the new adapter the active one; training goes on with the trained one.
    methods.activate(model, trained)
    reference = {}
    for name, param in model.named_parameters():
        if name not in trainable:
            param.requires_grad_(False)
        parts = name.split(".")
        if REFERENCE_ADAPTER in parts:
            reference[".".join(trained if part == REFERENCE_ADAPTER else part for part in parts)] = param
    mismatched = sorted(n for n, p in trainable.items() if n not in reference or reference[n].shape != p.shape)
    if mismatched or len(reference) != len(trainable):
        raise FtengineError(
            f"{option}: the adapter in {path} does not have the shape of the one this run trains "
            f"(first difference: {(mismatched or sorted(set(reference) - set(trainable)))[0]}); "
            f"set the method's options (lora.r, target_modules, ...) to those of the adapter"
        )
    if state.step == 0:
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(reference[name])


def data_fingerprint(datasets):
    digest = hashlib.sha256()
    for name, split in (("train", datasets.train), ("eval", datasets.eval), *datasets.eval_sets.items()):
        digest.update(json.dumps([name, [[e["chosen_ids"], e["rejected_ids"]] for e in split]]).encode())
    return digest.hexdigest()


def precompute_ref_logps(model, reference, datasets, state):
    """``{split: [N, 2] (chosen, rejected)}`` reference log-probs over every pair, batched."""
    cache, size = {}, state.config.train.eval_batch_size
    for split, examples in (("train", datasets.train), ("eval", datasets.eval), *datasets.eval_sets.items()):
        rows = []
        for start in range(0, len(examples), size):
            batch = to_device(datasets.collate(examples[start : start + size]), state.device)
            with autocast(state):
                rows.append(torch.stack(reference.compute(model, batch), dim=1).float().cpu())
        cache[split] = torch.cat(rows) if rows else torch.zeros(0, 2)
    return cache


def read_ref_logps(path, fingerprint):
    """The cached reference log-probs in ``path`` if they were computed for these pairs."""
    if not path.is_file():
        return None
    with safe_open(path, framework="pt") as handle:
        if (handle.metadata() or {}).get("fingerprint") != fingerprint:
            return None
        return {split: handle.get_tensor(split) for split in handle.keys()}


def ref_logps_cache(model, reference, datasets, state, full):
    """Reference log-probs for every pair: read from ``<output_dir>/ref_logps.safetensors`` when
    resuming over the same pairs, else computed now (with a temporary frozen copy for ``full``)
    and saved there. A fresh run always recomputes: the file may come from another model."""
    fingerprint = data_fingerprint(datasets)
    path = state.output_dir / REF_LOGPS_FILE
    cache = read_ref_logps(path, fingerprint) if state.step > 0 else None
    if cache is None:
        reference.frozen = frozen_copy(model, state) if full else None
        cache = precompute_ref_logps(model, reference, datasets, state)
        reference.frozen = None  # the cache replaces it: free the memory
        atomic_save_safetensors(path, cache, metadata={"fingerprint": fingerprint})
    return cache


# --------------------------------------------------------------------------------------------
# hooks
# --------------------------------------------------------------------------------------------


@hookimpl
def ftengine_config_section(register):
    register("dpo", DpoOptions)


@hookimpl
def ftengine_validate(config, active):
    options, problems = config.dpo, frozen_reference_problems(active, "dpo", "DPO")
    problems += pair_data_problems(config, "dpo", "the pair's log-probs and the reference's are per sequence")
    if options.label_smoothing and options.loss_type not in SMOOTHED_LOSSES:
        problems.append(
            f"dpo.label_smoothing: the '{options.loss_type}' loss has no label smoothing; "
            f"set it to 0 or use loss_type {' or '.join(SMOOTHED_LOSSES)}"
        )
    if options.init_adapter is not None and not (Path(options.init_adapter) / "adapter_config.json").is_file():
        problems.append(
            f"dpo.init_adapter: {options.init_adapter} holds no adapter_config.json; point it at a saved adapter (e.g. <sft output_dir>/final)"
        )
    return problems


@hookimpl
def ftengine_run_files(config):
    return [REF_LOGPS_FILE]


@hookimpl
def ftengine_load_dataset(config, tokenizer):
    return load_preferences(config, tokenizer)


@hookimpl
def ftengine_on_train_start(model, datasets, state):
    options = state.config.dpo
    full = state.adapter_name is None  # the method trains the model's own weights: no adapter to switch off
    reference = Reference(state.pm, state.adapter_name)
    if options.init_adapter is not None:
        if full:
            raise FtengineError(
                "dpo.init_adapter: this method trains no adapter to start from; set model: to the SFT model directory instead"
            )
        load_reference_adapter(model, state)
        reference.adapter = REFERENCE_ADAPTER
    if options.precompute_ref:
        reference.cache = ref_logps_cache(model, reference, datasets, state, full)
    elif full:
        reference.frozen = frozen_copy(model, state)
    state.plugin_data["dpo"] = reference


def run_reference(state):
    if "dpo" not in state.plugin_data:
        raise FtengineError("dpo: no reference model: ftengine_on_train_start must run before the first loss")
    return state.plugin_data["dpo"]


@hookimpl
def ftengine_compute_loss(model, batch, state):
    options, reference = state.config.dpo, run_reference(state)
    policy = sequence_logps(model, batch)
    ref = reference.logps(model, batch)
    tokens = (batch["labels"] != IGNORE_INDEX).sum(dim=1).chunk(2)
    losses = pair_losses(options, policy[0] - ref[0], policy[1] - ref[1], *tokens)
    metrics = pair_metrics(options, policy, ref)
    return LossOutput(loss=losses.sum(), count=len(losses), metrics=metrics)
