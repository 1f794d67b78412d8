"""A frozen copy of the (IA)³ test plugin as it was written for plugin API 0 (hook per step),
before adapter methods became objects: selecting it must say which API it was written for and
what to change, before anything loads. The layer math is the current package's.

The original docstring follows.

(IA)³ adapters (PEFT's ``IA3``) for ftengine: a third-party adapter method as a package.

    pip install -e tests/ia3_plugin
    ftengine run job.yaml --plugin ia3 -o 'ia3.target_modules=[k_proj,v_proj,down_proj]'
    ftengine generate --model M --adapter a=runs/x/final --prompt "Hi!"
    ftengine merge --model M --adapter runs/x/final --out merged/

Learned vectors scale the outputs of the attention targets and the inputs of the feed-forward
targets (``layer.py``). Results are PEFT ``IA3`` adapter directories, which
``peft.PeftModel.from_pretrained`` loads; ftengine finds this plugin for such a directory
through ``ftengine_adapter_plugins``. Only documented hooks and ``ftengine.adapters`` are used:
this package is the walk-through of docs/writing-plugins.md, "Writing an adapter method".
"""

import re
from pathlib import Path

import torch
from ftengine import hookimpl
from ftengine.adapters import check_adapter_name, read_adapter_config, read_adapter_tensors, short_target_names, write_adapter
from ftengine.config import Section
from ftengine.errors import AdapterError, ConfigError
from ftengine_ia3.layer import (
    ia3_layers,
    inject_adapter,
    is_feedforward,
    linear_modules,
    select_targets,
    unwrap_merged,
    vector_shape,
)
from pydantic import Field

__version__ = "0.1.0"

PLUGIN = "ia3"  # the entry-point name in pyproject.toml: what users pass to --plugin
PEFT_TYPE = "IA3"
KEY_PREFIX = "base_model.model."
conflicts = ("full",)

# PEFT IA3 options that change what an adapter computes and that this plugin does not
# implement: a file may hold them only at a neutral value (None, False, [], {}).
UNSUPPORTED_OPTIONS = ("fan_in_fan_out", "modules_to_save", "exclude_modules")


class IA3Options(Section):
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["k_proj", "v_proj", "down_proj"],
        description="layers to adapt: a list of names/path suffixes, a regex matching the whole module path, or 'all-linear'",
    )
    feedforward_modules: list[str] | str = Field(
        default_factory=lambda: ["down_proj"],
        description="the targets whose input (not output) is scaled; a list (a subset of a target_modules list) or a regex",
    )
    adapter_name: str = Field("default", description="the adapter's name in the model (no dots)")


# --------------------------------------------------------------------------------------------
# configure
# --------------------------------------------------------------------------------------------


@hookimpl
def ftengine_config_section(register):
    register("ia3", IA3Options)


def _pattern_problem(key, value):
    if isinstance(value, list) and not value:
        return f"ia3.{key}: the list is empty; name the layers, e.g. [k_proj, v_proj, down_proj]"
    if isinstance(value, str) and value != "all-linear":
        try:
            re.compile(value)
        except re.error as exc:
            return f"ia3.{key}: {value!r} is not a valid regular expression ({exc}); use a list of names"
    return None


@hookimpl
def ftengine_validate(config):
    options, problems = config.ia3, []
    try:
        check_adapter_name(options.adapter_name)
    except AdapterError as exc:
        problems.append(f"ia3.adapter_name: {exc}")
    for key in ("target_modules", "feedforward_modules"):
        problem = _pattern_problem(key, getattr(options, key))
        if problem:
            problems.append(problem)
    if options.feedforward_modules == "all-linear":
        problems.append(
            "ia3.feedforward_modules: 'all-linear' is for target_modules; name the feed-forward layers, e.g. [down_proj]"
        )
    targets, feedforward = options.target_modules, options.feedforward_modules
    if isinstance(targets, list) and isinstance(feedforward, list) and not set(feedforward) <= set(targets):
        extra = sorted(set(feedforward) - set(targets))
        problems.append(f"ia3.feedforward_modules: {extra} not in ia3.target_modules; add them there (PEFT requires a subset)")
    return problems


# --------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------


def _no_target_message(model, key, targets):
    names = list(linear_modules(model))
    return (
        f"{key}: {targets!r} matches no linear layer of this model; "
        f"its linear layers are named like {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}"
    )


@hookimpl
def ftengine_inject_adapters(model, config, training):
    """Add the adapter to train; at inference and merge (``training=False``) adapters come from files."""
    if not training:
        return
    options = config.ia3
    paths = select_targets(model, options.target_modules)
    if not paths:
        raise ConfigError([_no_target_message(model, "ia3.target_modules", options.target_modules)])
    for layer in inject_adapter(model, paths, options.adapter_name, options.feedforward_modules):
        layer.set_active_adapter(options.adapter_name)


@hookimpl
def ftengine_trainable_params(model):
    return [f"{path}.ia3_l.{name}" for path, layer in ia3_layers(model) for name in layer.ia3_l]


@hookimpl
def ftengine_adapter_name(config):
    return config.ia3.adapter_name


# --------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------


def adapter_config(options, base_model, target_paths, all_paths):
    """``adapter_config.json`` as PEFT writes it for IA3 (``peft_version`` aside: PEFT's own)."""
    targets = options.target_modules
    return {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "auto_mapping": None,
        "target_modules": short_target_names(target_paths, all_paths) if targets == "all-linear" else targets,
        "feedforward_modules": options.feedforward_modules,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_ia3_weights": True,
    }


@hookimpl
def ftengine_save_model(model, tokenizer, config, path):
    name = config.ia3.adapter_name
    layers = [(p, layer) for p, layer in ia3_layers(model) if name in layer.ia3_l]
    if not layers:
        raise AdapterError(f"the model holds no (IA)³ adapter named '{name}' to save")
    tensors = {f"{KEY_PREFIX}{p}.ia3_l": layer.ia3_l[name] for p, layer in layers}
    files = write_adapter(
        Path(path), adapter_config(config.ia3, config.model, [p for p, _ in layers], list(linear_modules(model))), tensors
    )
    tokenizer.save_pretrained(path)
    return [str(f) for f in files]


# --------------------------------------------------------------------------------------------
# load, switch, merge
# --------------------------------------------------------------------------------------------


@hookimpl
def ftengine_adapter_plugins(adapter_config):
    return [PLUGIN] if adapter_config.get("peft_type") == PEFT_TYPE else None


def _read_settings(path):
    """``(target_modules, feedforward_modules)`` of an IA3 directory, or ``None`` for another type."""
    where = Path(path) / "adapter_config.json"
    adapter = read_adapter_config(path)
    if adapter.get("peft_type") != PEFT_TYPE:
        return None
    for key in UNSUPPORTED_OPTIONS:
        if adapter.get(key) not in (None, False, [], {}):
            raise AdapterError(f"{where}: '{key}': {adapter[key]!r} is a PEFT option the ia3 plugin does not support")
    targets, feedforward = adapter.get("target_modules"), adapter.get("feedforward_modules")
    for key, value in (("target_modules", targets), ("feedforward_modules", feedforward)):
        if value is None or not isinstance(value, (str, list)):
            raise AdapterError(f"{where}: {key} is {value!r}; expected a list of module names or a regex")
    if not targets:
        raise AdapterError(f"{where}: target_modules is empty; the adapter adapts no layer")
    return targets, feedforward


@hookimpl
def ftengine_load_adapter(model, path, name):
    """Load a PEFT IA3 directory under ``name``; every check comes first, so a bad adapter
    leaves the model as it was."""
    path = Path(path)
    settings = _read_settings(path)
    if settings is None:
        return None
    targets, feedforward = settings
    check_adapter_name(name, loaded={n for _, layer in ia3_layers(model) for n in layer.ia3_l}, path=path)
    paths = select_targets(model, targets)
    if not paths:
        raise AdapterError(_no_target_message(model, f"{path / 'adapter_config.json'}: target_modules", targets))
    tensors = read_adapter_tensors(path)
    where = path / "adapter_model.safetensors"
    modules = linear_modules(model)
    expected = {}
    for target in paths:
        expected[f"{KEY_PREFIX}{target}.ia3_l"] = vector_shape(modules[target], is_feedforward(target, feedforward))
    for key in tensors:
        if key not in expected:
            raise AdapterError(
                f"{where}: tensor '{key}' fits no layer that target_modules {targets!r} selects in this base model (is it the right base model?)"
            )
    for key, shape in expected.items():
        if key not in tensors:
            raise AdapterError(f"{where}: no tensor '{key}', which target_modules {targets!r} select in this base model")
        if tuple(tensors[key].shape) != shape:
            raise AdapterError(
                f"{where}: '{key}' has shape {list(tensors[key].shape)} but the base model needs {list(shape)} (is it the right base model?)"
            )
    layers = inject_adapter(model, paths, name, feedforward)
    with torch.no_grad():
        for target, layer in zip(paths, layers):
            layer.ia3_l[name].copy_(tensors[f"{KEY_PREFIX}{target}.ia3_l"])
    return model


@hookimpl
def ftengine_loaded_adapters(model):
    return sorted({n for _, layer in ia3_layers(model) for n in layer.ia3_l})


@hookimpl
def ftengine_set_active_adapter(model, name):
    """Use adapter ``name`` in every (IA)³ layer; ``None``, or a name this plugin does not hold
    (another method's adapter), turns the (IA)³ layers off."""
    for _, layer in ia3_layers(model):
        layer.set_active_adapter(name)


@hookimpl
def ftengine_merge_adapters(model):
    layers = [layer for _, layer in ia3_layers(model)]
    for layer in layers:
        layer.merge()
    return any(layer.merged for layer in layers) or None


@hookimpl
def ftengine_unmerge_adapters(model):
    for _, layer in ia3_layers(model):
        layer.unmerge()


@hookimpl
def ftengine_unwrap_merged(model):
    unwrap_merged(model)
