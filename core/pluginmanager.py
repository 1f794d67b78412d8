"""Finding, selecting and registering plugins.

Plugins come from three places:

* built-ins: every module or package inside ``ftengine.plugins``, by module name. Those whose
  module says ``default = True`` (the HF loader, SFT, AdamW, the progress display) are always
  active unless blocked with ``--plugin no:NAME``; the others are selected by name.
* installed packages: entry points in the group ``ftengine`` (``[project.entry-points.ftengine]``
  ``myplugin = "my_package.plugin"``), selected by their entry-point name.
* a local module: ``--plugin my_package.my_module`` (any importable dotted path).

Selection problems (unknown names, missing requirements, conflicts, two plugins claiming one
exclusive hook) and contract problems (a plugin written for another major version of the plugin
API, an implementation that matches no hook, an adapter method object that does not fit
``ftengine.AdapterMethod``) are collected and raised together as one ``PluginError`` before the
tokenizer or any weights load.
"""

import difflib
import functools
import importlib
import importlib.metadata
import os
import pkgutil
import sys
from dataclasses import dataclass

import pluggy

from . import PLUGIN_API, hookspecs
from .config import shown
from .errors import PluginError
from .hookspecs import API_0_ADAPTER_HOOKS

PROJECT = "ftengine"

# At most one active non-default plugin may implement each of these.
EXCLUSIVE_HOOKS = (
    "ftengine_load_tokenizer",
    "ftengine_load_model",
    "ftengine_quantize_model",
    "ftengine_make_optimizer",
    "ftengine_load_dataset",
    "ftengine_compute_loss",
    "ftengine_parallelize",
)


@dataclass(frozen=True)
class PluginInfo:
    """Where a plugin comes from, before it is imported."""

    name: str
    source: str  # "builtin", "entry point (dist x.y)" or "module"
    target: str  # dotted module path or entry-point value


@functools.cache
def builtin_plugins():
    """Built-in plugins by name: every module and package directly inside ``ftengine.plugins``
    (looked up once per process, as ``entry_point_plugins``)."""
    import ftengine.plugins as package

    return {
        m.name: PluginInfo(m.name, "builtin", f"ftengine.plugins.{m.name}")
        for m in pkgutil.iter_modules(package.__path__)
        if not m.name.startswith("_")
    }


@functools.cache
def entry_point_plugins():
    """Installed third-party plugins by entry-point name, looked up once per process (a package
    installed while the process runs shows from the next ``ftengine`` command on)."""
    found = {}
    for ep in importlib.metadata.entry_points(group=PROJECT):
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown distribution"
        found[ep.name] = PluginInfo(ep.name, f"entry point ({dist})", ep.value)
    return found


def available_plugins():
    """Every plugin that can be selected by name; built-ins win over entry points."""
    return {**entry_point_plugins(), **builtin_plugins()}


def import_plugin(info):
    """Import a plugin's module (or the object an entry point names)."""
    module_path, _, attr = info.target.partition(":")
    obj = importlib.import_module(module_path)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


def new_plugin_manager():
    """A plugin manager with ftengine's hook specs and, if asked, hook tracing."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    if os.environ.get("FTENGINE_TRACE_HOOKS"):
        pm.trace.root.setwriter(lambda text: sys.stderr.write(text))
        pm.enable_tracing()
    return pm


def _did_you_mean(name, choices):
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def select_plugins(requested):
    """Import and register the default plugins plus ``requested``; check the set.

    :param requested: names from ``--plugin`` and the config's ``plugins:`` list. ``no:NAME``
        blocks a default plugin.
    :return: a plugin manager holding exactly the active plugins. Each registered plugin's
        name is ``pm.get_name(plugin)``.
    :raises PluginError: listing every problem with the selection.
    """
    problems = []
    known = available_plugins()
    blocked = {r[3:] for r in requested if r.startswith("no:")}
    wanted = [r for r in dict.fromkeys(requested) if not r.startswith("no:")]

    infos = []
    for name in wanted:
        if name in known:
            infos.append(known[name])
        elif "." in name:
            infos.append(PluginInfo(name.rsplit(".", 1)[-1], "module", name))
        else:
            problems.append(
                f"plugin {shown(name)}: unknown.{_did_you_mean(name, list(known))} "
                f"Run 'ftengine plugins' to list the available plugins."
            )

    plugins, builtins, blocked_defaults = {}, {}, {}
    defaults = set()
    for info in known.values():
        if info.source == "builtin" and info not in infos:
            module = builtins[info.name] = import_plugin(info)
            if getattr(module, "default", False) and info.name in blocked:
                blocked_defaults[info.name] = module
            elif getattr(module, "default", False):
                plugins[info.name] = module
                defaults.add(info.name)
    for info in infos:
        try:
            plugins[info.name] = import_plugin(info)
        except Exception as exc:  # a plugin that fails to import must fail loudly
            problems.append(f"plugin '{info.name}' ({info.target}) failed to import: {exc!r}")

    pm = new_plugin_manager()
    for name, plugin in plugins.items():
        pm.register(plugin, name=name)
    pm.hook.ftengine_addhooks.call_historic(kwargs={"pluginmanager": pm})
    active = frozenset(plugins)

    problems += _blocking_problems(blocked, blocked_defaults, pm, builtins)

    conflicting, missing = set(), set()
    for name, plugin in plugins.items():
        for needed in getattr(plugin, "requires", ()):
            alternatives = (needed,) if isinstance(needed, str) else tuple(needed)
            if not active & set(alternatives):
                missing |= {a for a in alternatives if a in known}
                options = " or ".join(f"--plugin {a}" for a in alternatives)
                wanted = " or ".join(f"'{a}'" for a in alternatives)
                problems.append(f"plugin '{name}' requires plugin {wanted}: add {options}.")
        conflicting |= {tuple(sorted((name, o))) for o in getattr(plugin, "conflicts", ()) if o in active}
    for a, b in sorted(conflicting):
        problems.append(f"plugins '{a}' and '{b}' conflict: select only one of them.")
    for hook_name in EXCLUSIVE_HOOKS:
        owners = [
            pm.get_name(impl.plugin)
            for impl in getattr(pm.hook, hook_name).get_hookimpls()
            if pm.get_name(impl.plugin) not in defaults
        ]
        if len(owners) > 1:
            problems.append(
                f"plugins {' and '.join(repr(o) for o in sorted(owners))} both implement "
                f"{hook_name}, which only one plugin may provide: select one of them."
            )
    problems += contract_problems(pm, plugins, explained=lambda: _pending_explained_by(missing, plugins, known))
    if problems:
        raise PluginError(problems)
    return pm


def _blocking_problems(blocked, blocked_defaults, pm, builtins):
    """What is wrong with the ``no:NAME`` of a selection: a name that is no default plugin, or a
    default whose exclusive hooks (the model, the data, the loss, the optimiser) no active plugin
    provides in its place, which would fail the run only once the model is loaded."""
    problems = []
    for name in sorted(blocked - set(blocked_defaults)):
        names = ", ".join(sorted(n for n, m in builtins.items() if getattr(m, "default", False)))
        problems.append(f"{shown('no:' + name)}: {shown(name)} is not a default plugin; only {names} can be blocked")
    for name, module in sorted(blocked_defaults.items()):
        orphaned = [h for h in EXCLUSIVE_HOOKS if hasattr(module, h) and not getattr(pm.hook, h).get_hookimpls()]
        if not orphaned:
            continue
        others = [n for n, m in builtins.items() if n != name and all(hasattr(m, h) for h in orphaned)]
        instead = f" (--plugin {' or --plugin '.join(others)})" if others else ""
        problems.append(
            f"no:{name} blocks the default plugin '{name}', the provider of {', '.join(orphaned)}, and no other active "
            f"plugin provides {'it' if len(orphaned) == 1 else 'them'}: remove no:{name}, or add a plugin that does{instead}."
        )
    return problems


MIGRATION = "see CHANGELOG.md, 'Migrating adapter plugins to plugin API 1'"


def _implemented(plugin, hook_name):
    return getattr(getattr(plugin, hook_name, None), f"{PROJECT}_impl", None) is not None


def api_version_problem(name, plugin):
    """Why ``plugin`` was written for another major version of the plugin API, or ``None``."""
    declared = getattr(plugin, "ftengine_plugin_api", None)
    old_hooks = [hook for hook in API_0_ADAPTER_HOOKS if _implemented(plugin, hook)]
    current = f"{PLUGIN_API[0]}.{PLUGIN_API[1]}"
    if old_hooks and declared in (None, 0):
        replaced = "; ".join(f"{hook} -> {API_0_ADAPTER_HOOKS[hook]}" for hook in old_hooks[:4])
        more = f"; and {len(old_hooks) - 4} more" if len(old_hooks) > 4 else ""
        return (
            f"plugin '{name}' was written for plugin API 0 (one hook per adapter step), which this ftengine (plugin API "
            f"{current}) no longer calls: move its adapter hooks into a method object that the plugin returns from "
            f"ftengine_adapter_methods ({replaced}{more}) and set ftengine_plugin_api = {PLUGIN_API[0]}; {MIGRATION}"
        )
    if declared is not None and declared != PLUGIN_API[0]:
        return (
            f"plugin '{name}' declares ftengine_plugin_api = {declared!r}, but this ftengine implements plugin API {current}: "
            f"install a release of the plugin written for plugin API {PLUGIN_API[0]}"
            + (f" ({MIGRATION})" if isinstance(declared, int) and declared < PLUGIN_API[0] else "")
        )
    return None


def contract_problems(pm, plugins, explained=lambda: False):
    """Every way the registered ``plugins`` (``{name: module}``) break the plugin contract, each
    naming the plugin, the member and the fix: the API version, hook implementations that match
    no spec (with a did-you-mean), adapter method objects that do not fit the protocol.

    :param explained: called when some implementations match no spec; ``True`` when a missing
        required plugin would add their specs (the "requires" message then says it all).
    """
    from .methods import check_method

    problems, old_api = [], set()
    for name, plugin in plugins.items():
        problem = api_version_problem(name, plugin)
        if problem:
            problems.append(problem)
            old_api.add(name)
    specs = [hook for hook, caller in vars(pm.hook).items() if caller.has_spec()]
    unknown = [
        (pm.get_name(impl.plugin), hook)
        for hook, caller in vars(pm.hook).items()
        if not caller.has_spec()
        for impl in caller.get_hookimpls()
    ]
    if unknown and not explained():
        for name, hook in unknown:
            if name not in old_api:
                problems.append(
                    f"plugin '{name}': {hook} is not a hook.{_did_you_mean(hook, specs)} Rename it to a hook of "
                    f"docs/hooks.md, or remove its @hookimpl"
                )
    for impl in pm.hook.ftengine_adapter_methods.get_hookimpls():
        name = pm.get_name(impl.plugin)
        try:
            methods = list(impl.function() or ())
        except Exception as exc:  # a broken plugin must be reported, not crash the selection
            problems.append(f"plugin '{name}': ftengine_adapter_methods failed: {exc!r}")
            continue
        for method in methods:
            problems += check_method(method, name)
    return problems


def all_plugins_manager(warn=None):
    """A plugin manager holding every available plugin, selected or not, for the hooks asked of
    all of them (``ftengine_register_commands``, ``ftengine_adapter_methods``). A plugin that
    fails to import is left out, and reported through ``warn(message)`` when given."""
    pm = new_plugin_manager()
    for info in available_plugins().values():
        try:
            pm.register(import_plugin(info), name=info.name)
        except Exception as exc:  # one broken plugin must not take the others down
            if warn is not None:
                warn(f"plugin '{info.name}' failed to import: {exc!r}")
    return pm


def allow_pickle_sections():
    """The config sections with which the installed model loader reads pickle weights
    (hook ``ftengine_allow_pickle``).

    :raises PluginError: no installed plugin loads pickle weights.
    """
    sections = all_plugins_manager().hook.ftengine_allow_pickle()
    if not sections:
        raise PluginError(["--allow-pickle: no installed model loader reads pickle weights; convert the model to safetensors"])
    return sections


def plugin_attribute(name, attribute, default=None):
    """A module attribute of the available plugin ``name`` (``changes_base``, ...), or ``default``."""
    info = available_plugins().get(name)
    return default if info is None else getattr(import_plugin(info), attribute, default)


def _pending_explained_by(missing, plugins, known):
    """Whether every unknown hook implementation would be known had the ``missing`` required
    plugins been selected (dora implements a hook that lora adds): then the "requires" message
    says it all, and an "unknown hook" line would only confuse."""
    if not missing:
        return False
    trial = new_plugin_manager()
    for name, plugin in plugins.items():
        trial.register(plugin, name=name)
    try:
        for name in missing:
            trial.register(import_plugin(known[name]), name=name)
        trial.hook.ftengine_addhooks.call_historic(kwargs={"pluginmanager": trial})
        trial.check_pending()
    except Exception:
        return False
    return True


def nondefault_implementers(pm, hook_name):
    """Names of the active non-default plugins that implement ``hook_name``."""
    defaults = getattr(pm, "ftengine_defaults", frozenset())
    names = [pm.get_name(impl.plugin) for impl in getattr(pm.hook, hook_name).get_hookimpls()]
    return [name for name in names if name not in defaults]


def active_names(pm):
    """The names of the plugins registered in ``pm``."""
    return frozenset(pm.get_name(p) for p in pm.get_plugins())


def describe_plugins():
    """Rows for ``ftengine plugins``: name, version, source, default, hooks implemented."""
    rows = []
    for info in sorted(available_plugins().values(), key=lambda i: (i.source != "builtin", i.name)):
        try:
            plugin = import_plugin(info)
        except Exception as exc:
            rows.append((info.name, "?", info.source, False, f"import failed: {exc!r}"))
            continue
        hooks = sorted(n for n in dir(plugin) if n.startswith("ftengine_"))
        version = getattr(plugin, "__version__", None) or _dist_version(info)
        rows.append((info.name, version, info.source, getattr(plugin, "default", False), hooks))
    return rows


def _dist_version(info):
    if info.source == "builtin":
        from . import __version__

        return __version__
    return info.source.rsplit(" ", 1)[-1].rstrip(")")
