"""Every hook ftengine calls. This file is the plugin API reference.

A plugin is a module (or object) with functions named like the specs below and decorated with
``ftengine.hookimpl``. An implementation may accept any subset of a hook's arguments, by name.
Hooks marked *firstresult* stop at the first implementation that returns something other than
``None``; the others call every implementation and collect the results in a list.

Hooks are for the phases of a run that many plugins join (configure, load, quantise, data,
loss, parallelise, evaluate, observe). An *adapter method* (LoRA, prompt tuning, ...) is one
object that owns its adapters' whole lifecycle: a plugin returns it from
``ftengine_adapter_methods``, and it implements ``ftengine.AdapterMethod`` (``ftengine.methods``:
inject, name, trainable names, save, claim a saved adapter, load, list, activate, per-row
selection, merge, unmerge, unwrap, delete). The core dispatches each call to the method that
holds the adapter.

**Versions.** ``ftengine.PLUGIN_API`` is ``(major, minor)``, now ``(1, 1)``. A plugin states the
major version it was written for as a module attribute, ``ftengine_plugin_api = 1``; a plugin
written for another major version, an implementation that matches no hook (with a
did-you-mean), and a method object that lacks a member or takes an argument the core does not
pass are reported together when plugins are selected, before anything loads. A plugin that
implements the hook-per-step adapter hooks of API 0 (``ftengine_inject_adapters``,
``ftengine_load_adapter``, ...) is told what replaces them (``CHANGELOG.md``, "Migrating
adapter plugins to API 1"). Within a major version nothing is removed: a hook renamed or retired
in a minor version keeps working for one more minor version, its spec marked
``@hookspec(warn_on_impl=retired_hook(...))``, so an implementation gets a
``DeprecationWarning`` naming the replacement when it is registered.

A plugin may also declare, as module attributes:

* ``requires = ("lora",)``: plugins that must be active alongside it; an entry that is a tuple
  names alternatives (``requires = (("lora", "prompt_tuning"),)``: one of them);
* ``conflicts = ("full",)``: plugins that must not be active alongside it;
* ``changes_base = True``: the plugin changes the base model an adapter trains over (``qlora``
  quantises it), so ``ftengine merge`` repeats it, with its config section, when the run that
  saved the adapter used it.

Which plugins load a saved adapter is not declared: the method objects of every installed
plugin are asked (``AdapterMethod.claims``).

Some hooks are *exclusive*: at most one active non-default plugin may implement them (two
losses, two model loaders, ...). Selecting two such plugins is an error naming both, reported
before any model is loaded. See ``ftengine.pluginmanager.EXCLUSIVE_HOOKS``.

The phases of a run, in order: configure, build, train, save. ``ftengine merge`` runs build,
loads an adapter and merges it; inference runs build, loads adapters and switches between them;
serving (``ftengine.serving``) also gives each row of a batch its own adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # annotations only: the reference names the types without importing them at run time
    from pathlib import Path

    import click
    import torch
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .config import Config, Section
    from .distributed import Parallel, World
    from .methods import AdapterMethod
    from .state import Datasets, LossOutput, RunState

    #: ``function(prompts, completions, rows) -> one float per completion`` (``ftengine_rewards``).
    RewardFunction = Callable[[list[str], list[str], list[dict[str, Any]]], list[float]]

hookspec = pluggy.HookspecMarker("ftengine")

#: The hook-per-step adapter hooks of plugin API 0, and what replaced each in API 1: the member
#: of the method object (``ftengine.AdapterMethod``) or the hook. A plugin implementing any of
#: them was written for API 0.
API_0_ADAPTER_HOOKS = {
    "ftengine_inject_adapters": "AdapterMethod.inject",
    "ftengine_adapter_name": "AdapterMethod.adapter_name",
    "ftengine_adapter_plugins": "AdapterMethod.claims",
    "ftengine_load_adapter": "AdapterMethod.load",
    "ftengine_loaded_adapters": "AdapterMethod.loaded",
    "ftengine_set_active_adapter": "AdapterMethod.activate",
    "ftengine_set_adapter_rows": "AdapterMethod.set_rows",
    "ftengine_delete_adapter": "AdapterMethod.delete",
    "ftengine_merge_adapters": "AdapterMethod.merge (a quantised base: ftengine_dequantize_model)",
    "ftengine_unmerge_adapters": "AdapterMethod.unmerge",
    "ftengine_unwrap_merged": "AdapterMethod.unwrap",
    "ftengine_wrap_model": "AdapterMethod.inject (return the wrapper) and AdapterMethod.load",
}


def retired_hook(name, replacement, since):
    """The ``warn_on_impl`` warning of a hook retired in minor version ``since`` (``(1, 1)``):
    ``@hookspec(warn_on_impl=retired_hook("ftengine_old", "ftengine_new", (1, 1)))`` keeps the
    spec, and its callers, for that minor version and warns every plugin that implements it."""
    return DeprecationWarning(
        f"{name} is deprecated since plugin API {since[0]}.{since[1]} and is removed in "
        f"{since[0]}.{since[1] + 1}: implement {replacement} instead (CHANGELOG.md)"
    )


# --------------------------------------------------------------------------------------------
# configure: plugin setup, CLI, config
# --------------------------------------------------------------------------------------------


@hookspec(historic=True)
def ftengine_addhooks(pluginmanager: pluggy.PluginManager) -> None:
    """Add a plugin's own hook specifications, so other plugins can extend it.

    Called once for every registered plugin, including plugins registered later (historic).
    The ``lora`` plugin uses it to add ``ftengine_lora_variant``, ``ftengine_lora_kernel`` and
    ``ftengine_lora_rows_kernel``.

    :param pluginmanager: the ``pluggy.PluginManager``; call
        ``pluginmanager.add_hookspecs(module)``.
    """


@hookspec
def ftengine_register_commands(cli: click.Group) -> None:
    """Add commands to the ``ftengine`` command-line interface.

    Called once when the CLI starts, for every installed plugin (not only the selected ones),
    so that plugin commands show in ``ftengine --help``.

    :param cli: the ``click.Group`` behind ``ftengine``; call ``cli.command()`` or
        ``cli.add_command``.
    """


@hookspec(firstresult=True)
def ftengine_default_job() -> dict[str, Any] | None:
    """The job ``ftengine run`` runs with no config file and no ``--plugin``, as a config dict
    (what a YAML config file holds; ``-o`` overrides apply on top).

    Asked of every installed plugin, selected or not, before the run's plugins are chosen; the
    first answer wins. A task package provides it (the demo, ``examples/contacts``, returns its
    ``default_job.yaml`` after generating the data it names). With no implementation,
    ``ftengine run`` without arguments says how to install one.
    """


@hookspec(firstresult=True)
def ftengine_allow_pickle() -> dict[str, dict[str, Any]] | None:
    """The config sections with which this plugin's model loader reads pickle weights
    (``pytorch_model.bin``, which can run code), for ``--allow-pickle``. Firstresult.

    Asked of every installed plugin. The default loader (plugin ``hf_loader``) returns
    ``{"hf_loader": {"allow_pickle": True}}``; ``ftengine run`` turns the answer into ``-o``
    overrides (so the resume command keeps it), ``ftengine merge`` into its sections.
    """


@hookspec
def ftengine_config_section(register: Callable[[str, type[Section]], None]) -> None:
    """Declare this plugin's configuration section.

    :param register: call ``register("lora", LoraOptions)`` where ``LoraOptions`` is a pydantic
        model. Its fields (with defaults) become the ``lora:`` section of the YAML config and
        the ``-o lora.key=value`` overrides. Unknown keys and bad values in the section are
        reported with every other configuration error, at once.
    """


@hookspec
def ftengine_validate(config: Config, active: frozenset[str], pm: pluggy.PluginManager) -> list[str] | None:
    """Check that the configuration and the active plugin set make sense together.

    Called after every config section parsed, before any model is loaded.

    :param config: the validated ``ftengine.config.Config``.
    :param active: the names of the active plugins (a ``frozenset`` of str).
    :param pm: the run's plugin manager, to ask the other plugins' hooks what they contribute
        (``grpo`` checks ``pm.hook.ftengine_rewards`` before the model loads). Added in 1.1.
    :return: a list of messages, each naming the offending key or plugin and the fix (an empty
        list or ``None`` when all is well). All messages from all plugins are shown together.
    """


@hookspec
def ftengine_run_files(config: Config) -> list[str] | None:
    """Name the files and directories this plugin writes into ``output_dir``.

    ``--overwrite`` moves them aside into ``replaced-<time>/`` with the core's own
    (``config.json``, ``metrics.jsonl``, ``checkpoints/``, ``final/``, ``report.png``), so an
    earlier run's files are neither deleted nor mixed with the new run's.

    :param config: the run ``Config``.
    :return: a list of names inside ``output_dir`` (e.g. ``["tensorboard"]``), or ``None``.
        Anything else (a bare string, an absolute path, a ``..``) stops the run before the
        model loads, naming the plugin.
    """


# --------------------------------------------------------------------------------------------
# build: model, quantisation, adapters, trainable parameters, optimiser, data
# --------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def ftengine_load_tokenizer(config: Config) -> PreTrainedTokenizerBase:
    """Load the tokenizer alone, before any model weights. Exclusive, firstresult.

    A run reads and validates all its data with this tokenizer before the model loads, so a
    bad row costs seconds, not the minutes a large model takes to load. The default (plugin
    ``hf_loader``) reads the tokenizer of ``config.model``. A plugin that implements
    ``ftengine_load_model`` should implement this hook too; if it does not, the data is read
    after the model, with the tokenizer ``ftengine_load_model`` returns.

    :param config: the run ``Config``.
    :return: the tokenizer (with a pad token, right padding) that ``ftengine_load_model`` will
        return alongside the model.
    """


@hookspec(firstresult=True)
def ftengine_load_model(config: Config) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base model and its tokenizer. Exclusive, firstresult.

    The default implementation (plugin ``hf_loader``) reads a local transformers directory, a
    hub id or a ``.gguf`` file (dequantised once and cached as safetensors), and fetches the
    embedded default model when ``config.model`` is ``"default"``.

    :param config: the run ``Config``.
    :return: ``(model, tokenizer)``: a ``transformers`` causal LM in float32 on CPU, and its
        tokenizer (with a pad token).
    """


@hookspec(firstresult=True)
def ftengine_quantize_model(model: nn.Module, config: Config) -> bool | None:
    """Quantise the frozen base weights in place. Exclusive, firstresult.

    Called after the model moved to its device and before adapters are injected, so adapter
    layers wrap the quantised layers.

    :param model: the base model.
    :param config: the run ``Config``.
    :return: ``True`` when the model was quantised (``None`` to pass).
    """


@hookspec
def ftengine_dequantize_model(model: nn.Module) -> None:
    """Give the quantised base layers back a plain floating-point weight, in place.

    Called before adapters are merged (``ftengine merge``, ``AdapterMethod.merge``): an adapter
    folds into a real float weight; merging into a 4-bit one would quantise it a second time.
    ``qlora`` replaces its ``Linear4bit`` layers (adapter base layers included) by ``nn.Linear``.

    :param model: a model holding adapters over a (possibly) quantised base.
    """


@hookspec
def ftengine_adapter_methods() -> list[AdapterMethod]:
    """The adapter methods this plugin provides, as objects implementing
    ``ftengine.AdapterMethod`` (see ``ftengine.methods`` and docs/writing-plugins.md, section 6).

    Asked of the active plugins for a run, and of every installed plugin (selected or not) to
    find which plugins load a saved adapter (``AdapterMethod.claims``). Each object is checked
    against the protocol when the plugin is selected: a missing member or a parameter the core
    does not pass is reported, naming the plugin and the member, before anything loads.

    :return: a list of method objects (usually one).
    """


@hookspec
def ftengine_trainable_params(model: nn.Module, config: Config) -> Iterable[str]:
    """Name the parameters this plugin trains, for a method that trains the model's own weights
    (``full``); adapter methods name theirs with ``AdapterMethod.trainable_names``.

    The core trains the union over all plugins and adapter methods, freezes every other
    parameter, and checkpoints exactly these (so a LoRA checkpoint holds only the adapter).

    :param model: the model after injection and wrapping.
    :param config: the run ``Config``.
    :return: an iterable of names as in ``model.named_parameters()``.
    """


@hookspec(firstresult=True)
def ftengine_parallelize(
    model: nn.Module, params: list[tuple[str, nn.Parameter]], config: Config, world: World
) -> Parallel | None:
    """Wrap the model to train it on several processes. Exclusive, firstresult.

    Called once per rank on a training run, after the model is built and all but the trainable
    parameters are frozen, and before the optimiser is built (it may replace parameters by
    shards: the optimiser gets the parameters of ``Parallel.unwrap()`` with the same names).
    The core has created the process group (``world``); with no implementation, or one that
    returns ``None``, the run is a single process (``ftengine.distributed.Parallel``, where each
    method is a no-op). A run on several processes that no plugin parallelises is refused.

    The returned object offers what the loop needs: ``model`` (what the loss is computed
    with), ``unwrap()``, ``no_sync()`` (all but the last micro-batch of a step),
    ``full_model()`` (a block where the parameters are whole, for saving),
    ``full_optimizer_state``/``load_optimizer_state``/``load_param`` (checkpoints hold whole
    tensors, so any world size resumes them) and ``grad_norm``. The loop divides gradients by
    the step's target count over ``world.size``: the wrapper must average them over the ranks
    (as DDP and FSDP do).

    :param model: the built model (on ``world.device``), trainable parameters marked.
    :param params: ``[(name, parameter), ...]`` of the trainable parameters.
    :param config: the run ``Config``.
    :param world: the ``ftengine.distributed.World``: ``rank``, ``size``, ``device``.
    :return: an ``ftengine.distributed.Parallel`` (subclass), or ``None`` to leave the run to
        a single process (when ``world.size`` is 1).
    """


@hookspec(firstresult=True)
def ftengine_make_optimizer(
    model: nn.Module, params: list[tuple[str, nn.Parameter]], config: Config
) -> torch.optim.Optimizer | None:
    """Build the optimiser. Exclusive, firstresult; the default is AdamW (plugin ``adamw``).

    :param model: the model being trained.
    :param params: ``[(name, parameter), ...]`` of every trainable parameter, in a fixed order.
    :param config: the run ``Config`` (``config.train.lr``, ``config.train.weight_decay``).
    :return: a ``torch.optim.Optimizer``.
    """


@hookspec(firstresult=True)
def ftengine_load_dataset(config: Config, tokenizer: PreTrainedTokenizerBase) -> Datasets:
    """Read and tokenise the training and evaluation data. Exclusive, firstresult.

    The default (plugin ``sft``) reads JSONL prompt/response or chat rows and masks everything
    but the response tokens. Bad rows raise ``ftengine.errors.DataError`` naming ``file:line``
    and the field, before training starts.

    :param config: the run ``Config`` (``config.data``, ``config.train.max_length``).
    :param tokenizer: the tokenizer from ``ftengine_load_tokenizer`` (called before the model
        loads), or from ``ftengine_load_model`` when the model loader has no tokenizer hook.
    :return: an ``ftengine.state.Datasets``: ``train`` and ``eval`` lists of examples, and a
        ``collate(examples) -> batch`` function that pads a list of examples into tensors.
    """


@hookspec(firstresult=True)
def ftengine_compute_loss(model: nn.Module, batch: dict[str, Any], state: RunState) -> LossOutput:
    """Compute the loss of one micro-batch. Exclusive, firstresult; the default is SFT.

    In training, ``model`` may be a parallel wrapper (``DistributedDataParallel``) around the
    model the other hooks get: call it for the forward pass, but switch adapters on the model
    itself (the one ``ftengine_on_train_start`` received).

    The loss is returned as a *sum* with its *count* (target tokens for SFT, pairs for DPO),
    so that gradient accumulation divides by the total count over all micro-batches of an
    optimiser step rather than averaging per-micro-batch means.

    :param model: the model being trained (or evaluated, under ``torch.no_grad``).
    :param batch: what ``Datasets.collate`` returned, moved to the model's device.
    :param state: the ``ftengine.state.RunState``.
    :return: an ``ftengine.state.LossOutput(loss_sum, count, metrics)``; ``metrics`` values are
        sums too, divided by the total count when logged (as ``eval_<name>`` in evaluation). A loss
        that scores nothing in evaluation returns a count of 0: the core then logs no ``eval_loss``.
    """


@hookspec
def ftengine_rewards(config: Config) -> dict[str, RewardFunction] | None:
    """Named reward functions for the losses that learn from rewards (``grpo``). Added in 1.1.

    Every active plugin may contribute; the loss calls each function once per generation batch
    and weighs them by its own config (``grpo.reward_weights``, by name). Two plugins giving the
    same name is an error naming both. A reward function that raises, returns another number of
    values than completions, or a value that is not a finite number stops the step with a message
    naming the function and the row.

    A reward function is called as ``function(prompts, completions, rows)``:

    * ``prompts``: the prompt of each completion as the model saw it (the chat template applied);
    * ``completions``: the generated text (special tokens and anything after a stop string cut);
    * ``rows``: the data row each prompt came from (its reference fields: an expected answer);

    all three of the same length (each prompt and row repeated once per generation), and returns
    one float per completion.

    :param config: the run ``Config`` (a plugin reads its own section for its settings).
    :return: ``{name: function}``, or ``None`` if this plugin gives no reward.
    """


# --------------------------------------------------------------------------------------------
# train: callbacks and evaluation
# --------------------------------------------------------------------------------------------


@hookspec
def ftengine_on_train_start(model: nn.Module, tokenizer: PreTrainedTokenizerBase, datasets: Datasets, state: RunState) -> None:
    """Called once after the model, optimiser and data are ready, before the first step.

    On a fresh run the model is still the base model here: a plugin that compares against the
    base without keeping a copy (a forgetting check under full fine-tuning) computes what it
    needs now.

    :param model: the model to train.
    :param tokenizer: its tokenizer.
    :param datasets: the ``Datasets`` from ``ftengine_load_dataset`` (DPO precomputes reference
        log-probs over them).
    :param state: the ``RunState`` (``state.step`` is above 0 when resuming).
    """


@hookspec
def ftengine_on_log(state: RunState, record: dict[str, Any]) -> None:
    """Called for each metrics record: every ``train.log_every`` steps and every evaluation.

    Called on the main process only. The core writes each record as one line of
    ``metrics.jsonl``; the ``progress`` plugin shows them, the ``tensorboard`` plugin is an
    example of a logging plugin.

    :param state: the ``RunState``.
    :param record: a dict; training records hold ``step``, ``loss``, ``lr``, ``grad_norm``,
        ``tokens_per_s``, ``step_time_s``; evaluation records hold ``step``, ``eval_*`` keys
        (``eval_<set>_*`` for ``data.eval_sets``) and ``eval_time_s``; a baseline's evaluation
        (``eval.baselines``) is a step-0 record with ``baseline`` (its name) as well.
    """


@hookspec
def ftengine_on_step_end(model: nn.Module, state: RunState) -> None:
    """Called after every optimiser step (after logging and checkpointing for that step).

    :param model: the model being trained.
    :param state: the ``RunState``.
    """


@hookspec
def ftengine_eval_metrics(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    datasets: Datasets,
    state: RunState,
    shots: list[list[dict[str, str]]] | None,
) -> dict[str, float] | None:
    """Compute evaluation metrics besides the eval loss.

    Called every ``train.eval_every`` steps, at the end of training, before training with
    ``--eval-before``, and for the ``eval.baselines``; once per evaluation set (``data.eval``,
    then each of ``data.eval_sets`` as ``datasets.eval``, named by ``datasets.eval_name``). The
    model is in eval mode under ``torch.no_grad``.

    A task plugin supports the ``few_shot`` baseline by taking ``shots`` in its signature; the
    others are not called for it. A metric that does not depend on the eval rows should be
    computed when ``datasets.eval_name`` is ``None`` only.

    A metric that takes long (generation over many rows) calls ``state.check_stop()`` between
    its batches: on SIGINT/SIGTERM it raises, and the run saves a checkpoint and stops instead
    of waiting for the whole evaluation. On several processes every rank calls it at the same
    points.

    :param model: the model being trained.
    :param tokenizer: its tokenizer.
    :param datasets: the ``Datasets``; each example keeps its source row under ``"row"``.
    :param state: the ``RunState``.
    :param shots: ``None``, or (``few_shot`` baseline) the training conversations (lists of
        chat messages) to place before every prompt.
    :return: a dict of metric name to number (names without the ``eval_`` prefix; the core
        adds it). Two plugins returning the same name is an error. A generation-based task
        should also return ``prompt_tokens``, the mean tokens of its prompts (what a request
        costs, shown for the baselines).
    """


@hookspec
def ftengine_headline_metrics() -> list[str] | None:
    """The evaluation metrics that say most about this plugin's task, most important first.

    Names as the plugin's ``ftengine_eval_metrics`` returns them, without the ``eval_`` and
    evaluation-set prefixes (``exact_match``). ``report.png`` shows them first, for every
    evaluation set (``eval_exact_match``, ``eval_heldout_exact_match``, ...).
    """


@hookspec
def ftengine_on_train_end(model: nn.Module, state: RunState) -> None:
    """Called once at the end of a run that completed: after the result is saved to ``final/``
    and the final evaluation is logged.

    :param model: the trained model.
    :param state: the ``RunState``.
    """


# --------------------------------------------------------------------------------------------
# save, load, merge, inference
# --------------------------------------------------------------------------------------------


@hookspec
def ftengine_save_model(model: nn.Module, tokenizer: PreTrainedTokenizerBase, config: Config, path: Path) -> list[str] | None:
    """Save what this plugin trained into the directory ``path``.

    For a method that trains the model's own weights (``full``: a transformers model
    directory); adapter methods save with ``AdapterMethod.save``. Write atomically
    (``ftengine.checkpoint.atomic_write``).

    :param model: the trained model.
    :param tokenizer: its tokenizer.
    :param config: the run ``Config``.
    :param path: a ``pathlib.Path`` to an existing directory.
    :return: a list of the files written, or ``None`` if this plugin saves nothing.
    """
