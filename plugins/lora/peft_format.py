"""Reading and writing LoRA adapters exactly as PEFT does.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (metadata
``{"format": "pt"}``). Tensor keys are the in-memory parameter names without the adapter name,
prefixed by ``base_model.model.``::

    model.layers.0.self_attn.q_proj.lora_A.default.weight        (in memory)
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   (on disk)

    ...q_proj.lora_magnitude_vector.default  ->  base_model.model....q_proj.lora_magnitude_vector

Config keys written, as PEFT writes them: ``peft_type``, ``task_type``,
``base_model_name_or_path``, ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``,
``use_rslora``, ``use_dora``, ``bias``, ``fan_in_fan_out``, ``init_lora_weights``,
``modules_to_save``. On reading, PEFT options ftengine does not implement are accepted at their
neutral value and refused otherwise; keys ftengine does not know are dropped with a warning
(a newer PEFT may add keys; PEFT itself reads adapters that way).
"""

import math
import warnings

import torch
from ftengine.adapters import (
    CONFIG_FILE,
    KEY_PREFIX,
    WEIGHTS_FILE,
    read_adapter_config,
    read_adapter_tensors,
    short_target_names,
    write_adapter,
)
from ftengine.errors import AdapterError

# PEFT options that change what an adapter computes and that ftengine does not implement: an
# adapter may only hold them at a neutral value (this one, or null / false / {} / []).
UNSUPPORTED_OPTIONS = {
    "bias": "none",
    "fan_in_fan_out": False,
    "modules_to_save": None,
    "lora_bias": False,
    "rank_pattern": None,
    "alpha_pattern": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "exclude_modules": None,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
    "use_bdlora": None,
    "kasa_config": None,
    "velora_config": None,
    "arrow_config": None,
    "monteclora_config": None,
}
# PEFT keys that describe how an adapter was made, not what it computes.
METADATA_KEYS = {
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "peft_version",
    "auto_mapping",
    "megatron_config",
    "megatron_core",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "qalora_group_size",
    "ensure_weight_tying",
}
# The keys ftengine reads, with the values PEFT's LoraConfig assumes when a config omits them.
READ_KEYS = {
    "r": 8,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "use_rslora": False,
    "use_dora": False,
    "init_lora_weights": True,
    "target_modules": None,
}


# The largest value a float32 holds: a scale or update beyond it is infinity in the layer.
FLOAT32_MAX = torch.finfo(torch.float32).max

# --------------------------------------------------------------------------------------------
# tensor names
# --------------------------------------------------------------------------------------------


def peft_key(module_path, parameter_name):
    """The on-disk key of a ``LoraLinear`` parameter (``lora_A.<adapter>.weight``)."""
    attribute, _adapter, *rest = parameter_name.split(".")
    return ".".join([f"{KEY_PREFIX}{module_path}", attribute, *rest])


def split_peft_key(key):
    """``(module path, suffix)`` of an on-disk key: suffix like ``lora_A.weight``."""
    path, sep, suffix = key.removeprefix(KEY_PREFIX).partition(".lora_")
    if not key.startswith(KEY_PREFIX) or not sep:
        raise AdapterError(f"'{key}' is not a PEFT LoRA tensor name (base_model.model.<module>.lora_...)")
    return path, f"lora_{suffix}"


def parameter_name(suffix, adapter):
    """The in-memory name of an on-disk suffix: ``lora_A.weight`` -> ``lora_A.<adapter>.weight``."""
    attribute, *rest = suffix.split(".")
    return ".".join([attribute, adapter, *rest])


def adapter_tensors(layers, adapter):
    """``{on-disk key: tensor}`` of adapter ``adapter`` over ``[(path, LoraLinear), ...]``."""
    tensors = {}
    for path, layer in layers:
        for name, param in layer.named_parameters():
            if name.split(".")[1:2] == [adapter] and not name.startswith("base_layer."):
                tensors[peft_key(path, name)] = param
    return tensors


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _json_number(value):
    return int(value) if float(value).is_integer() else value


def adapter_config(options, *, base_model, target_paths, linear_paths, variant):
    """The ``adapter_config.json`` contents for an adapter made with ``options`` (``LoraOptions``).

    ``all-linear`` is written as PEFT writes it: the short names of the layers it selected
    (``["down_proj", ..., "v_proj"]``), or their full paths where short names would select more.
    """
    target_modules = options.target_modules
    if target_modules == "all-linear":
        target_modules = short_target_names(target_paths, linear_paths)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": options.r,
        "lora_alpha": _json_number(options.alpha),
        "lora_dropout": options.dropout,
        "target_modules": target_modules,
        "use_rslora": options.rslora,
        "use_dora": variant is not None and variant.peft_flag == "use_dora",
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": "gaussian" if options.init == "gaussian" else True,
        "modules_to_save": None,
    }


def save_lora_adapter(directory, layers, adapter, options, base_model, linear_paths):
    """Write adapter ``adapter`` of ``[(path, LoraLinear), ...]`` into ``directory``; return the paths.

    :param linear_paths: every adaptable layer of the model (to write short target names).
    """
    layers = [(path, layer) for path, layer in layers if adapter in layer.lora_A]
    if not layers:
        raise AdapterError(f"the model holds no LoRA adapter named '{adapter}' to save")
    variant = layers[0][1].variant[adapter]
    target_paths = [p for p, _ in layers]
    config = adapter_config(options, base_model=base_model, target_paths=target_paths, linear_paths=linear_paths, variant=variant)
    return write_adapter(directory, config, adapter_tensors(layers, adapter))


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def _is_neutral(value, neutral):
    return value == neutral or value in (None, False, {}, [])


def read_lora_config(directory):
    """The LoRA settings in ``adapter_config.json`` (the ``READ_KEYS``, defaults filled in), or
    ``None`` when the adapter is not a LoRA adapter.

    Options ftengine cannot honour are errors naming the key; unknown keys are dropped with a
    warning.
    """
    path = directory / CONFIG_FILE
    config = read_adapter_config(directory)
    if config.get("peft_type") != "LORA":
        return None
    unsupported = [k for k, neutral in UNSUPPORTED_OPTIONS.items() if k in config and not _is_neutral(config[k], neutral)]
    if unsupported:
        key = unsupported[0]
        raise AdapterError(
            f"{path}: '{key}': {config[key]!r} is a PEFT option ftengine does not support (only {UNSUPPORTED_OPTIONS[key]!r})"
        )
    if not config.get("target_modules"):
        raise AdapterError(f"{path}: target_modules is not set (ftengine does not guess the adapted layers from the model type)")
    unknown = sorted(set(config) - set(READ_KEYS) - METADATA_KEYS - set(UNSUPPORTED_OPTIONS))
    if unknown:
        warnings.warn(f"{path}: dropped key(s) unknown to ftengine: {', '.join(unknown)}", stacklevel=2)
    return {key: config.get(key, default) for key, default in READ_KEYS.items()}


def read_lora_tensors(directory):
    """``{module path: {suffix: tensor}}`` from ``adapter_model.safetensors``."""
    by_module = {}
    for key, tensor in read_adapter_tensors(directory).items():
        module, suffix = split_peft_key(key)
        by_module.setdefault(module, {})[suffix] = tensor
    return by_module


def check_fits(directory, model_modules, target_paths, tensors, expected_shapes):
    """Raise ``AdapterError`` naming the first module whose tensors do not fit the model.

    :param model_modules: the model's adaptable layers by path (``layer.linear_modules``).
    :param target_paths: the paths the adapter's ``target_modules`` select in this model.
    :param tensors: ``{module path: {suffix: tensor}}`` from the file.
    :param expected_shapes: ``fn(layer) -> {suffix: shape}`` for one module of this adapter.
    """
    where = directory / WEIGHTS_FILE
    for path in tensors:
        if path not in model_modules:
            raise AdapterError(
                f"{where}: the adapter has weights for module '{path}', which the base model does not have (is it the right base model?)"
            )
        if path not in target_paths:
            raise AdapterError(f"{where}: the adapter has weights for module '{path}', which its target_modules do not select")
    for path in target_paths:
        found = tensors.get(path)
        if found is None:
            raise AdapterError(
                f"{where}: no weights for module '{path}', which the adapter's target_modules select in this base model"
            )
        expected = expected_shapes(model_modules[path])
        for suffix, shape in expected.items():
            if suffix not in found:
                raise AdapterError(f"{where}: module '{path}': tensor '{suffix}' is missing")
            if tuple(found[suffix].shape) != tuple(shape):
                raise AdapterError(
                    f"{where}: module '{path}': {suffix} has shape {list(found[suffix].shape)} in the adapter "
                    f"but the base model needs {list(shape)} (is it the right base model?)"
                )
        extra = sorted(set(found) - set(expected))
        if extra:
            raise AdapterError(f"{where}: module '{path}': unexpected tensor(s) {extra} (a LoRA variant that is not active?)")


def check_alpha(directory, alpha):
    """Raise ``AdapterError`` for a ``lora_alpha`` that is NaN or infinite (JSON readers accept both)."""
    if isinstance(alpha, (int, float)) and not math.isfinite(alpha):
        raise AdapterError(
            f"{directory / CONFIG_FILE}: lora_alpha is {alpha}; it must be a finite positive number "
            f"(usually r or 2·r): fix it in the file, or save the adapter again"
        )


def check_scale(directory, tensors, alpha, r, scale):
    """Raise ``AdapterError`` when ``scale`` (alpha / r), or an update ``scale · B A``, is beyond
    float32: the layer would output infinities, or NaN where B is zero.

    :param tensors: ``{module path: {suffix: tensor}}`` from the file.
    """
    if not scale <= FLOAT32_MAX:
        raise AdapterError(
            f"{directory / CONFIG_FILE}: lora_alpha {alpha} with r {r} gives the scale {scale:.3g}, beyond float32 "
            f"(about {FLOAT32_MAX:.3g}); lora_alpha is usually r or 2·r: fix it in the file, or save the adapter again"
        )
    for module, found in tensors.items():
        A, B = found["lora_A.weight"].double(), found["lora_B.weight"].double()
        bound = B.abs().max() * A.abs().max() * r * scale  # cheap; the exact product only above it
        if bound > FLOAT32_MAX and (B @ A).abs().max() * scale > FLOAT32_MAX:
            raise AdapterError(
                f"{directory / WEIGHTS_FILE}: module '{module}': lora_B · lora_A × {scale:.3g} (lora_alpha / r) overflows "
                f"float32; the adapter would output infinities: check lora_alpha in {CONFIG_FILE}, or use an earlier checkpoint"
            )
