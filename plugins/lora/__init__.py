"""LoRA: train low-rank updates of the linear layers; the base model stays frozen.

    ftengine run job.yaml --plugin lora -o lora.r=8 -o lora.target_modules=[q_proj,v_proj]

Adapters are named (``lora.adapter_name``); a model may hold several and use one or none at a
time. Results are PEFT adapter directories (``peft_format``), which ``PeftModel.from_pretrained``
loads and which ``ftengine merge`` folds into a plain transformers model.

Other plugins extend LoRA through the hooks this plugin adds (``lora/hookspecs.py``): a
*variant* changes what an adapter computes (``dora``), a *kernel* computes a layer faster, in
training or in mixed-adapter batches (``fused_lora``).
"""

import json
import re
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import torch
from ftengine import hookimpl
from ftengine.adapters import CONFIG_FILE, adapter_name_problem
from ftengine.config import Section, at_most, shown
from ftengine.errors import AdapterError, ConfigError
from pydantic import Field, PositiveInt, ValidationError

from . import hookspecs, peft_format
from .layer import inject_adapter, linear_modules, lora_layers, lora_scaling, select_targets, unwrap_merged

conflicts = ("full",)


class LoraOptions(Section):
    aliases: ClassVar[dict[str, str]] = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout"}

    r: Annotated[
        PositiveInt,
        at_most(2048, "LoRA ranks are typically 8 to 256; an update of a higher rank costs about what full fine-tuning does"),
    ] = Field(16, description="rank of the update B·A")
    alpha: float = Field(32, gt=0, description="the update is scaled by alpha / r (alpha / sqrt(r) with rslora)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] | str = Field(
        "all-linear",
        description="layers to adapt: 'all-linear' (all but the output head), a regex matching the whole module path, or a list of names/path suffixes",
    )
    rslora: bool = Field(False, description="rank-stabilised scaling alpha / sqrt(r)")
    init: Literal["kaiming", "gaussian"] = Field("kaiming", description="init of A (B starts at zero)")
    adapter_name: str = Field("default", description="the adapter's name in the model")


@hookimpl
def ftengine_addhooks(pluginmanager):
    pluginmanager.add_hookspecs(hookspecs)


@hookimpl
def ftengine_config_section(register):
    register("lora", LoraOptions)


@hookimpl
def ftengine_validate(config):
    options, problems = config.lora, []
    hidden_size, source = _hidden_size(config.model)
    if hidden_size is not None and options.r > hidden_size:
        problems.append(
            f"lora.r: {options.r} is above the model's hidden size ({hidden_size}) in {source}: the update B·A "
            f"already has full rank at r = {hidden_size}, a larger r only adds memory; use a smaller r, typically 8 to 64"
        )
    if adapter_name_problem(options.adapter_name):
        problems.append(f"lora.adapter_name: {adapter_name_problem(options.adapter_name)}")
    targets = options.target_modules
    if isinstance(targets, list) and not targets:
        problems.append(
            "lora.target_modules: the list is empty; name the layers to adapt, e.g. [q_proj, v_proj], or use 'all-linear'"
        )
    elif isinstance(targets, str) and targets != "all-linear":
        try:
            re.compile(targets)
        except re.error as exc:
            problems.append(
                f"lora.target_modules: {shown(targets)} is not a valid regular expression ({exc}); use a list of names or 'all-linear'"
            )
    return problems


def _hidden_size(model):
    """``(hidden size, config.json path)`` of ``model`` when it is a local transformers directory:
    known before the weights load. ``(None, None)`` for anything else (a hub id, a GGUF file)."""
    path = Path(model).expanduser() / "config.json"
    try:
        return int(json.loads(path.read_text())["hidden_size"]), path
    except (OSError, ValueError, TypeError, KeyError):
        return None, None


def _variant_for_adapter(pluginmanager, config, adapter, path):
    """The variant a saved adapter needs: none for plain LoRA, else the active variant whose
    ``peft_flag`` its config sets (only ``use_dora`` exists in PEFT's LoRA format)."""
    if not adapter["use_dora"]:
        return None
    variant = pluginmanager.hook.ftengine_lora_variant(config=config)
    if variant is None or variant.peft_flag != "use_dora":
        raise AdapterError(f"{path}: a DoRA adapter (use_dora: true); activate the dora plugin (--plugin dora) to load it")
    return variant


def _no_target_message(model, key, targets):
    names = list(linear_modules(model))
    return (
        f"{key}: {shown(targets)} matches no linear layer of this model; "
        f"its linear layers are named like {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}"
    )


def _inject(model, paths, options, variant):
    """Wrap the layers at ``paths`` with adapter ``options.adapter_name`` made from ``options``."""
    return inject_adapter(
        model,
        paths,
        options.adapter_name,
        r=options.r,
        alpha=options.alpha,
        dropout=options.dropout,
        rslora=options.rslora,
        init=options.init,
        variant=variant,
    )


@hookimpl
def ftengine_on_train_start(model, state):
    for _, layer in lora_layers(model):
        name = layer.active_adapter
        if name is not None:
            layer.kernel[name] = state.pm.hook.ftengine_lora_kernel(layer=layer, name=name)


@hookimpl
def ftengine_adapter_methods():
    return [LORA]


class LoraMethod:
    """LoRA adapters as an ``ftengine.AdapterMethod``: each ``LoraLinear`` holds them by name."""

    def inject(self, model, config, pluginmanager):
        options = config.lora
        paths = select_targets(model, options.target_modules)
        if not paths:
            raise ConfigError([_no_target_message(model, "lora.target_modules", options.target_modules)])
        for layer in _inject(model, paths, options, pluginmanager.hook.ftengine_lora_variant(config=config)):
            layer.set_active_adapter(options.adapter_name)

    def adapter_name(self, config):
        return config.lora.adapter_name

    def trainable_names(self, model):
        return [
            f"{path}.{name}"
            for path, layer in lora_layers(model)
            for name, _ in layer.named_parameters()
            if not name.startswith("base_layer.")
        ]

    def save(self, model, tokenizer, config, path):
        options = config.lora
        files = peft_format.save_lora_adapter(
            Path(path), lora_layers(model), options.adapter_name, options, config.model, linear_modules(model)
        )
        tokenizer.save_pretrained(path)
        return files

    def claims(self, adapter_config):
        """LoRA's format has one variant flag, ``use_dora``, which the ``dora`` plugin loads."""
        if adapter_config.get("peft_type") != "LORA":
            return None
        return ["lora", "dora"] if adapter_config.get("use_dora") else ["lora"]

    def load(self, model, path, name, config, pluginmanager):
        """Load a PEFT LoRA/DoRA directory under ``name``; validate everything first, so a bad
        adapter leaves the model as it was."""
        path = Path(path)
        adapter = peft_format.read_lora_config(path)
        peft_format.check_alpha(path, adapter["lora_alpha"])
        try:
            options = LoraOptions(
                r=adapter["r"],
                alpha=adapter["lora_alpha"],
                dropout=adapter["lora_dropout"],
                target_modules=adapter["target_modules"],
                rslora=adapter["use_rslora"],
                init="gaussian" if adapter["init_lora_weights"] == "gaussian" else "kaiming",
                adapter_name=name,
            )
        except ValidationError as exc:
            error = exc.errors()[0]
            raise AdapterError(f"{path / CONFIG_FILE}: {'.'.join(map(str, error['loc']))}: {error['msg']}") from None
        variant = _variant_for_adapter(pluginmanager, config, adapter, path)

        modules = linear_modules(model)
        targets = select_targets(model, options.target_modules)
        if not targets:
            raise AdapterError(_no_target_message(model, f"{path / CONFIG_FILE}: target_modules", options.target_modules))
        tensors = peft_format.read_lora_tensors(path)

        def expected_shapes(module):
            shapes = {"lora_A.weight": (options.r, module.in_features), "lora_B.weight": (module.out_features, options.r)}
            return shapes | (variant.parameter_shapes(module) if variant is not None else {})

        peft_format.check_fits(path, modules, targets, tensors, expected_shapes)
        scale = lora_scaling(options.alpha, options.r, options.rslora)
        peft_format.check_scale(path, tensors, options.alpha, options.r, scale)
        layers = _inject(model, targets, options, variant)
        with torch.no_grad():
            for target, layer in zip(targets, layers):
                parameters = dict(layer.named_parameters())
                for suffix, tensor in tensors[target].items():
                    parameters[peft_format.parameter_name(suffix, name)].copy_(tensor)
        for layer in layers:  # a kernel for mixed-adapter batches (serving), if a plugin offers one
            layer.rows_kernel = pluginmanager.hook.ftengine_lora_rows_kernel(layer=layer)

    def loaded(self, model):
        return sorted({n for _, layer in lora_layers(model) for n in layer.lora_A})

    def activate(self, model, name):
        for _, layer in lora_layers(model):
            layer.set_active_adapter(name)

    def set_rows(self, model, names):
        """Per-row adapters in every LoRA layer; a layer lacking a row's adapter runs its base for
        that row (an adapter targeting fewer layers)."""
        shared = {}  # layers with the same adapters share the rows' index tensors
        for _, layer in lora_layers(model):
            layer.set_adapter_rows(names, shared)

    def merge(self, model):
        layers = [layer for _, layer in lora_layers(model)]
        for layer in layers:
            layer.merge()
        return any(layer.merged for layer in layers)

    def unmerge(self, model):
        for _, layer in lora_layers(model):
            layer.unmerge()

    def unwrap(self, model):
        unwrap_merged(model)

    def delete(self, model, name):
        for _, layer in lora_layers(model):
            layer.delete_adapter(name)

    def lora_export_refusal(self, adapter_config):
        if adapter_config.get("use_dora"):
            return "a dora adapter (use_dora) cannot be written as a LoRA: DoRA rescales each row of the updated weight"
        return None

    def lora_factors(self, model, name):
        """``{weight name: (A, B, scale)}`` of adapter ``name``. A variant's adapter is refused:
        DoRA rescales each row of the updated weight, which no ``W + scale · B A`` expresses."""
        factors = {}
        for path, layer in lora_layers(model):
            if name not in layer.lora_A:
                continue
            variant = layer.variant[name]
            if variant is not None:
                raise AdapterError(
                    f"adapter '{name}' is a {variant.name} adapter: method {variant.name} cannot be written as a LoRA "
                    f"(it rescales the weights); write the merged model instead: leave out --lora-only"
                )
            factors[f"{path}.weight"] = (
                layer.lora_A[name].weight.detach(),
                layer.lora_B[name].weight.detach(),
                layer.scaling[name],
            )
        return factors


LORA = LoraMethod()
