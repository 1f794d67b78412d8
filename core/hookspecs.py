"""Every hook ftengine calls. This file is the plugin API reference.

A plugin is a module (or object) with functions named like the specs below and decorated with
``ftengine.hookimpl``. An implementation may accept any subset of a hook's arguments, by name.
Hooks marked *firstresult* stop at the first implementation that returns something other than
``None``; the others call every implementation and collect the results in a list.

A plugin may also declare, as module attributes:

* ``requires = ("lora",)``: plugins that must be active alongside it; an entry that is a tuple
  names alternatives (``requires = (("lora", "prompt_tuning"),)``: one of them);
* ``conflicts = ("full",)``: plugins that must not be active alongside it;
* ``changes_base = True``: the plugin changes the base model an adapter trains over (``qlora``
  quantises it), so ``ftengine merge`` repeats it, with its config section, when the run that
  saved the adapter used it.

Which plugins load a saved adapter is not declared: every installed plugin is asked
(``ftengine_adapter_plugins``).

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
    from .state import Datasets, LossOutput, RunState

hookspec = pluggy.HookspecMarker("ftengine")

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
def ftengine_validate(config: Config, active: frozenset[str]) -> list[str] | None:
    """Check that the configuration and the active plugin set make sense together.

    Called after every config section parsed, before any model is loaded.

    :param config: the validated ``ftengine.config.Config``.
    :param active: the names of the active plugins (a ``frozenset`` of str).
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
def ftengine_inject_adapters(model: nn.Module, config: Config, pluginmanager: pluggy.PluginManager, training: bool) -> None:
    """Wrap the modules this plugin adapts, in place.

    Each adapter plugin wraps only its own modules and freezes nothing else itself (the core
    freezes every parameter not named by ``ftengine_trainable_params``). Injection must be
    deterministic given ``torch.manual_seed(config.train.seed)``, so that a resumed run can
    rebuild the same adapters and load their trained values.

    :param model: the (possibly quantised) base model.
    :param config: the run ``Config``.
    :param pluginmanager: the run's plugin manager, to call hooks a plugin added itself
        (``lora`` calls ``ftengine_lora_variant`` here).
    :param training: ``True`` when the run trains; ``False`` when the model is built for
        inference or merging, where adapters come from files (``ftengine_load_adapter``): add
        no fresh adapter then.
    """


@hookspec(firstresult=True)
def ftengine_wrap_model(model: nn.Module, tokenizer: PreTrainedTokenizerBase, config: Config, training: bool) -> nn.Module | None:
    """Return a module that wraps the whole model, or ``None``. Exclusive, firstresult.

    For adapters that change the model's inputs rather than its layers (prompt tuning prepends
    virtual tokens). The wrapper must keep the causal-LM interface: ``forward(input_ids=,
    attention_mask=, labels=)`` returning an object with ``.logits`` aligned to ``input_ids``,
    ``generate(...)``, ``config``, and ``get_base_model()`` returning the wrapped model.

    :param model: the model with adapters injected.
    :param tokenizer: the model's tokenizer (prompt tuning initialises from text with it).
    :param config: the run ``Config``.
    :param training: ``False`` when building for inference or merging (see
        ``ftengine_inject_adapters``): a wrapper then holds no fresh adapter, or is not needed.
    """


@hookspec
def ftengine_trainable_params(model: nn.Module, config: Config) -> Iterable[str]:
    """Name the parameters this plugin trains.

    The core trains the union over all plugins, freezes every other parameter, and checkpoints
    exactly these (so a LoRA checkpoint holds only the adapter).

    :param model: the model after injection and wrapping.
    :param config: the run ``Config``.
    :return: an iterable of names as in ``model.named_parameters()``.
    """


@hookspec(firstresult=True)
def ftengine_adapter_name(config: Config) -> str | None:
    """The name of the adapter this plugin trains. Firstresult.

    Stored as ``RunState.adapter_name``: plugins that switch adapters during training (DPO's
    reference is the model with adapters off, then this one back on) read it there. Methods
    that train the model's own weights (``full``) do not implement it, and the name is ``None``.

    :param config: the run ``Config``.
    :return: the adapter name, or ``None``.
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
        sums too, divided by the total count when logged (as ``eval_<name>`` in evaluation).
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

    Adapter plugins write PEFT-format files with ``ftengine.adapters.write_adapter``; a method
    that trains the model's own weights writes a transformers model directory. Write
    atomically (``ftengine.checkpoint.atomic_write``).

    :param model: the trained model.
    :param tokenizer: its tokenizer.
    :param config: the run ``Config``.
    :param path: a ``pathlib.Path`` to an existing directory.
    :return: a list of the files written, or ``None`` if this plugin saves nothing.
    """


@hookspec
def ftengine_adapter_plugins(adapter_config: dict[str, Any]) -> list[str] | None:
    """Name the plugins that load an adapter with this ``adapter_config.json``.

    Asked of every *installed* plugin, selected or not, before a model is built for
    ``ftengine generate``, ``ftengine merge`` or ``ftengine.inference.load_for_inference``: the
    answers (merged in order) are the plugins activated to load the adapter. Claim your own
    ``peft_type`` (and the flags of variants you implement); leave others' alone.

    :param adapter_config: the directory's ``adapter_config.json`` as a dict.
    :return: plugin names as ``--plugin`` takes them (your own and any it requires, e.g.
        ``["lora", "dora"]`` for a LoRA adapter with ``use_dora``), or ``None`` when the adapter
        is not yours.
    """


@hookspec(firstresult=True)
def ftengine_load_adapter(
    model: nn.Module, path: Path, name: str, config: Config, pluginmanager: pluggy.PluginManager
) -> nn.Module | None:
    """Load a saved adapter directory into ``model`` under ``name``. Firstresult.

    An implementation reads ``adapter_config.json`` (``ftengine.adapters.read_adapter_config``),
    returns ``None`` for a ``peft_type`` it does not handle, and otherwise loads the adapter or
    raises an error naming the first module or tensor that does not fit, leaving the model
    unchanged. A name already loaded is refused (``ftengine.adapters.check_adapter_name``).

    :param model: a model built for inference (possibly already holding other adapters).
    :param path: the adapter directory (``pathlib.Path``).
    :param name: the name to load it under (``"default"`` unless several are loaded).
    :param config: the run ``Config``.
    :param pluginmanager: the plugin manager (to check e.g. that ``dora`` is active for a DoRA
        adapter).
    :return: the model to use from now on (the same object or a wrapper), or ``None``.
    """


@hookspec
def ftengine_loaded_adapters(model: nn.Module) -> list[str] | None:
    """Name the adapters this plugin holds in ``model``.

    ``ftengine.inference.set_adapter`` refuses a name no plugin holds, listing the loaded ones,
    so adapters of several methods can be loaded side by side and switched between.

    :param model: a model holding adapters.
    :return: the names, or ``None``.
    """


@hookspec
def ftengine_set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Make adapter ``name`` the active one; ``None`` disables all adapters (the base model).

    Used to swap adapters at inference and as DPO's reference model (adapters disabled). A
    name this plugin does not hold (another method's adapter) turns this plugin's adapters off.

    :param model: a model holding adapters.
    :param name: an adapter name, or ``None``.
    """


@hookspec
def ftengine_set_adapter_rows(model: nn.Module, names: list[str | None] | None) -> list[str] | None:
    """Make row ``i`` of the model's next forwards use adapter ``names[i]``; ``None`` restores
    the single active adapter (``ftengine_set_active_adapter``) for every row.

    Used by ``ftengine.serving`` to run requests for different adapters in one batch. Each
    plugin handles the names it holds and treats the others as "no adapter of mine" (a row
    named ``None`` is the base model). An implementation must give each row exactly the output
    that row gets with its adapter active alone, or raise ``AdapterError`` naming the adapter it
    cannot mix. The setting lasts until the next call; the batch size of the forwards must be
    ``len(names)``.

    :param model: a model built for inference, holding adapters.
    :param names: one adapter name (or ``None``) per row, or ``None``.
    :return: the names among ``names`` this plugin applies per row. A loaded adapter that no
        plugin claims (its plugin does not implement this hook) is refused by the server,
        rather than silently served as the base model.
    """


@hookspec
def ftengine_delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from ``model`` and free its parameters.

    Used to unload an adapter while serving. A plugin removes ``name`` if it holds it and does
    nothing otherwise; the name may then be loaded again.

    :param model: a model holding adapters.
    :param name: an adapter name.
    """


@hookspec
def ftengine_merge_adapters(model: nn.Module) -> bool | None:
    """Fold the active adapters into the base weights; merging twice changes nothing.

    ``qlora`` implements it with ``tryfirst=True`` to replace 4-bit base layers by dequantised
    ones before the adapters are folded in (merging into a 4-bit weight would re-quantise it).
    A method whose adapters cannot be merged raises an ``AdapterError`` saying why.

    :param model: a model holding adapters.
    :return: ``True`` when this plugin's adapter is now merged; ``ftengine merge`` refuses to
        write a model into which no plugin merged anything.
    """


@hookspec
def ftengine_unmerge_adapters(model: nn.Module) -> None:
    """Undo ``ftengine_merge_adapters``, restoring the base weights.

    :param model: a model holding merged adapters.
    """


@hookspec
def ftengine_unwrap_merged(model: nn.Module) -> nn.Module | None:
    """After a merge, replace adapter layers by plain modules so the model saves as a plain
    transformers model.

    :param model: a model whose adapters are merged.
    :return: the model to save (the same object or a replacement), or ``None``.
    """
