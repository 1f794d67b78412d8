"""Adapter methods as objects: the ``AdapterMethod`` protocol and the dispatcher over them.

An adapter method (LoRA, prompt tuning, a third party's (IA)³) is one object that a plugin
returns from ``ftengine_adapter_methods``; it owns the whole lifecycle of its adapters::

    class IA3Method:
        def inject(self, model, config): ...          # a fresh adapter, to train
        def adapter_name(self, config): ...           # its name
        def trainable_names(self, model): ...
        def save(self, model, tokenizer, config, path): ...
        def claims(self, adapter_config): ...         # ["ia3"] for peft_type IA3, else None
        def load(self, model, path, name): ...
        def loaded(self, model): ...                  # names this method holds in model
        def activate(self, model, name): ...          # None: this method's adapters off
        def set_rows(self, model, names): ...         # serving: one adapter (or None) per row
        def merge(self, model): ...
        def unmerge(self, model): ...
        def unwrap(self, model): ...
        def delete(self, model, name): ...
        def lora_factors(self, model, name): ...      # optional (plugin API 1.1)

The core (``AdapterMethods``) knows which method holds which adapter name, from each method's
``loaded(model)``, and sends each call to the method concerned: ``activate(name)`` goes to the
owner with ``name`` and to every other method holding adapters with ``None``; ``set_rows``
gives each method only its own names (the other rows ``None``). A method therefore never asks
"is this adapter mine?". Adapter names are checked once, by the core, across methods.

A member may accept any subset of the protocol's parameters, by name, as hook
implementations may; ``check_method`` names a missing member or an unknown parameter when the
plugin is selected, before anything loads. The members in ``OPTIONAL_MEMBERS`` may be left
out: a method without one is refused by name when it is needed (``lora_factors``: a LoRA
export), and works for everything else.
"""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .adapters import CONFIG_FILE, check_adapter_name, read_adapter_config
from .errors import AdapterError

if TYPE_CHECKING:  # annotations only
    import pluggy
    from torch import Tensor, nn
    from transformers import PreTrainedTokenizerBase

    from .config import Config


@runtime_checkable
class AdapterMethod(Protocol):
    """What an adapter method object provides. The core calls each member with keyword
    arguments; an implementation may leave out parameters it does not need."""

    def inject(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, config: Config, pluginmanager: pluggy.PluginManager
    ) -> nn.Module | None:
        """Add one fresh adapter to train (deterministic under the run's seed: a resumed run
        rebuilds it), active. Return the model to use from now on (a wrapper that keeps the
        causal-LM interface and ``get_base_model()``, as prompt tuning's does), or ``None``
        when the model itself was changed in place."""

    def adapter_name(self, config: Config) -> str:
        """The name of the adapter ``inject`` adds."""

    def trainable_names(self, model: nn.Module) -> list[str]:
        """Names, as in ``model.named_parameters()``, of the parameters to train. The core
        freezes every other parameter and checkpoints exactly these."""

    def save(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, config: Config, path: Path) -> list[str]:
        """Write the trained adapter into the directory ``path`` (PEFT's files, with
        ``ftengine.adapters.write_adapter``); return the files written."""

    def claims(self, adapter_config: dict[str, Any]) -> list[str] | None:
        """The plugins that load an adapter with this ``adapter_config.json`` (this method's own
        plugin and any it needs), or ``None`` when it is another method's. Asked of every
        installed plugin's methods, selected or not."""

    def load(
        self, model: nn.Module, path: Path, name: str, config: Config, pluginmanager: pluggy.PluginManager
    ) -> nn.Module | None:
        """Load the adapter directory ``path`` (one this method claims) under ``name`` (checked
        by the core: valid, not loaded). Check everything first, so a bad file raises an
        ``AdapterError`` naming it and leaves the model as it was. Return the model to use from
        now on (a wrapper), or ``None`` when the model itself was changed in place."""

    def loaded(self, model: nn.Module) -> list[str]:
        """The names of the adapters this method holds in ``model``."""

    def activate(self, model: nn.Module, name: str | None) -> None:
        """Use adapter ``name`` (one this method holds); ``None``: this method's adapters off."""

    def set_rows(self, model: nn.Module, names: list[str | None] | None) -> None:
        """Make row ``i`` of the next forwards use adapter ``names[i]`` (one of this method's,
        or ``None``: none of this method's); ``names=None`` goes back to ``activate``'s single
        adapter. Each row must get the output it gets with its adapter active alone; a method
        that cannot mix adapters in a batch raises ``AdapterError`` saying so."""

    def merge(self, model: nn.Module) -> bool:
        """Fold the active adapter into the base weights; a second merge changes nothing. Return
        whether something is merged; a method that cannot merge raises ``AdapterError``."""

    def unmerge(self, model: nn.Module) -> None:
        """Undo ``merge``, restoring the base weights."""

    def unwrap(self, model: nn.Module) -> nn.Module | None:
        """After ``merge``, put plain modules back so the model saves as a plain transformers
        model; return the model to save, or ``None`` when changed in place."""

    def delete(self, model: nn.Module, name: str) -> None:
        """Remove adapter ``name`` and free its parameters; the name may be loaded again."""

    def lora_factors(self, model: nn.Module, name: str) -> dict[str, tuple[Tensor, Tensor, float]]:
        """Optional (plugin API 1.1). Adapter ``name`` as low-rank updates of the base weights:
        ``{weight name: (A [r, in], B [out, r], scale)}``, each weight becoming
        ``W + scale · B A``, named as in the merged model's ``state_dict()``
        (``model.layers.0.self_attn.q_proj.weight``). What a LoRA export (``--lora-only``, a
        GGUF that llama.cpp applies over the base) writes. Leave it out when the method's
        adapters are not such updates (prompt tuning adds tokens); raise ``AdapterError`` for one
        adapter that is not (a DoRA adapter rescales each row of W)."""


OPTIONAL_MEMBERS = ("lora_factors",)
PROTOCOL_MEMBERS = tuple(
    name for name in AdapterMethod.__dict__ if not name.startswith("_") and callable(AdapterMethod.__dict__[name])
)
MEMBERS = tuple(name for name in PROTOCOL_MEMBERS if name not in OPTIONAL_MEMBERS)


def _parameters(function):
    return [p for p in inspect.signature(function).parameters.values() if p.name != "self"]


PROTOCOL_PARAMETERS = {member: [p.name for p in _parameters(getattr(AdapterMethod, member))] for member in PROTOCOL_MEMBERS}


def check_method(method, plugin):
    """Problems with the method object ``method`` of ``plugin``: a missing member, a member that
    is not callable, or one whose signature does not fit the protocol; each names the fix. An
    optional member is checked only when the method has it."""
    label = f"plugin '{plugin}': adapter method {type(method).__name__}"
    problems = []
    for member in PROTOCOL_MEMBERS:
        function = getattr(method, member, None)
        expected = PROTOCOL_PARAMETERS[member]
        signature = f"{member}(self{''.join(f', {p}' for p in expected)})"
        if function is None:
            if member in OPTIONAL_MEMBERS:
                continue
            problems.append(f"{label} has no member '{member}': add {signature} (see ftengine.AdapterMethod)")
            continue
        if not callable(function):
            problems.append(f"{label}.{member} is not callable: make it a method {signature}")
            continue
        try:
            parameters = _parameters(function)
        except (TypeError, ValueError):
            continue  # a builtin without a signature: nothing to check
        for parameter in parameters:
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            if parameter.name not in expected:
                close = difflib.get_close_matches(parameter.name, expected, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                problems.append(
                    f"{label}.{member} takes '{parameter.name}', which the core does not pass.{hint} "
                    f"Its parameters are a subset of {signature}"
                )
            elif parameter.kind is parameter.POSITIONAL_ONLY:
                problems.append(f"{label}.{member}: '{parameter.name}' is positional-only; the core passes it by name")
    return problems


class _Bound:
    """One method object, with each member called with the arguments it accepts."""

    def __init__(self, method, plugin):
        self.method, self.plugin = method, plugin
        self._accepts = {}
        for member in PROTOCOL_MEMBERS:
            if not hasattr(method, member):  # an optional member left out
                continue
            parameters = _parameters(getattr(method, member))
            takes_all = any(p.kind is p.VAR_KEYWORD for p in parameters)
            self._accepts[member] = None if takes_all else {p.name for p in parameters}

    def has(self, member):
        return member in self._accepts

    def call(self, member, **kwargs):
        accepts = self._accepts[member]
        return getattr(self.method, member)(**(kwargs if accepts is None else {k: v for k, v in kwargs.items() if k in accepts}))


def _methods_of(pm):
    """``[(plugin name, method object), ...]`` of every plugin registered in ``pm``."""
    found = []
    for impl in pm.hook.ftengine_adapter_methods.get_hookimpls():
        plugin = pm.get_name(impl.plugin)
        found += [(plugin, method) for method in impl.function() or ()]
    return found


class AdapterMethods:
    """The adapter methods of a run's active plugins, and the dispatch of every adapter call
    to the method that holds the adapter (see the module docstring)."""

    def __init__(self, pm):
        self.pm = pm
        self.methods = [_Bound(method, plugin) for plugin, method in _methods_of(pm)]

    # training ------------------------------------------------------------------------------

    def inject(self, model, tokenizer, config):
        """Every method adds its fresh adapter; return the model to train."""
        for bound in self.methods:
            model = bound.call("inject", model=model, tokenizer=tokenizer, config=config, pluginmanager=self.pm) or model
        return model

    def adapter_name(self, config):
        """The name of the adapter this run trains, or ``None`` when no method is active."""
        return next((bound.call("adapter_name", config=config) for bound in self.methods), None)

    def trainable_names(self, model):
        return {name for bound in self.holding(model) for name in bound.call("trainable_names", model=model)}

    def save(self, model, tokenizer, config, path):
        return [
            str(f)
            for bound in self.holding(model)
            for f in bound.call("save", model=model, tokenizer=tokenizer, config=config, path=path)
        ]

    # names ---------------------------------------------------------------------------------

    def owners(self, model):
        """``{adapter name: bound method}`` of the adapters in ``model``."""
        return {name: bound for bound in self.methods for name in bound.call("loaded", model=model)}

    def holding(self, model):
        """The methods that hold at least one adapter in ``model``."""
        return [bound for bound in self.methods if bound.call("loaded", model=model)]

    def loaded(self, model):
        """The names of every adapter in ``model``, sorted."""
        return sorted(self.owners(model))

    # loading -------------------------------------------------------------------------------

    def load(self, model, path, name, config):
        """Load the adapter directory ``path`` under ``name`` with the active method that claims
        it; return the model to use from now on."""
        path = Path(path)
        adapter_config = read_adapter_config(path)
        check_adapter_name(name, self.owners(model), path)
        bound = next((b for b in self.methods if b.call("claims", adapter_config=adapter_config)), None)
        if bound is None:
            raise AdapterError(
                f"{path / CONFIG_FILE}: no active plugin loads peft_type {adapter_config.get('peft_type')!r}; "
                f"add the plugin that made it with --plugin"
            )
        return bound.call("load", model=model, path=path, name=name, config=config, pluginmanager=self.pm) or model

    def delete(self, model, name):
        owner = self.owners(model).get(name)
        if owner is not None:
            owner.call("delete", model=model, name=name)

    # switching -----------------------------------------------------------------------------

    def activate(self, model, name):
        """Make ``name`` the active adapter (``None``: the base model): its owner gets the name,
        every other method ``None``."""
        owners = self.owners(model)
        if name is not None and name not in owners:
            raise AdapterError(f"no adapter named '{name}' is loaded (loaded: {', '.join(sorted(owners)) or 'none'})")
        for bound in dict.fromkeys(owners.values()):
            bound.call("activate", model=model, name=name if owners.get(name) is bound else None)

    def set_rows(self, model, names):
        """Row ``i`` of the next forwards uses ``names[i]``; each method sees only its own names."""
        owners = self.owners(model)
        for bound in dict.fromkeys(owners.values()):
            own = None if names is None else [n if owners.get(n) is bound else None for n in names]
            bound.call("set_rows", model=model, names=own)

    # merging -------------------------------------------------------------------------------

    def merge(self, model):
        """Fold the active adapters into the weights (a quantised base is dequantised first,
        ``ftengine_dequantize_model``); return whether any method merged something."""
        holding = self.holding(model)
        if holding:
            self.pm.hook.ftengine_dequantize_model(model=model)
        merged = [bool(bound.call("merge", model=model)) for bound in holding]  # every method, then any()
        return any(merged)

    def unmerge(self, model):
        for bound in self.holding(model):
            bound.call("unmerge", model=model)

    def unwrap(self, model):
        for bound in self.holding(model):
            model = bound.call("unwrap", model=model) or model
        return model

    # exporting -----------------------------------------------------------------------------

    def lora_factors(self, model, name):
        """Adapter ``name`` as ``{weight name: (A, B, scale)}``, from the method that holds it;
        a method without ``lora_factors`` is refused by name."""
        owner = self.owners(model).get(name)
        if owner is None:
            raise AdapterError(f"no adapter named '{name}' is loaded (loaded: {', '.join(self.loaded(model)) or 'none'})")
        _refuse_without_lora_factors(owner, f"adapter '{name}'")
        return owner.call("lora_factors", model=model, name=name)

    def check_lora_export(self, path):
        """Refuse, before any weights load, the adapter directory ``path`` when the method that
        loads it cannot export a LoRA."""
        adapter_config = read_adapter_config(path)
        for bound in self.methods:
            if bound.call("claims", adapter_config=adapter_config):
                _refuse_without_lora_factors(bound, str(path))


def _refuse_without_lora_factors(bound, what):
    if not bound.has("lora_factors"):
        raise AdapterError(
            f"{what}: method {type(bound.method).__name__} of plugin '{bound.plugin}' cannot write its adapter as a LoRA "
            f"(it has no lora_factors); write the merged model instead"
        )


def adapter_methods(pm):
    """The ``AdapterMethods`` of the plugin manager ``pm`` (built once per manager)."""
    methods = getattr(pm, "ftengine_methods", None)
    if methods is None:
        methods = pm.ftengine_methods = AdapterMethods(pm)
    return methods


def plugins_for_adapter(path):
    """The plugins that load the adapter directory ``path``: the methods of every available
    plugin are asked (``claims``) with its ``adapter_config.json``."""
    from .pluginmanager import all_plugins_manager

    adapter_config = read_adapter_config(path)
    broken = []
    pm = all_plugins_manager(warn=broken.append)
    claims = [
        names for _, method in _methods_of(pm) if (names := _Bound(method, "").call("claims", adapter_config=adapter_config))
    ]
    if not claims:
        also = f" (and {'; '.join(broken)})" if broken else ""
        raise AdapterError(
            f"{Path(path) / CONFIG_FILE}: no installed plugin loads peft_type {adapter_config.get('peft_type')!r}{also}; "
            f"install the plugin that made it (run 'ftengine plugins' to list those installed)"
        )
    return list(dict.fromkeys(name for names in claims for name in names))
