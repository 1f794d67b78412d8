"""Adapter directories, for every adapter plugin: PEFT's two files, names, and who loads what.

An adapter directory holds what PEFT writes and reads::

    adapter_config.json          {"peft_type": "LORA", "r": 16, "target_modules": ["q_proj", ...], ...}
    adapter_model.safetensors    tensors keyed "base_model.model.<module path>.<name>", metadata {"format": "pt"}

An adapter plugin builds the config dict and the tensors; this module writes them atomically
(each file appears whole or not at all, mode 0644 under the usual umask), reads them back with
one ``AdapterError`` for a missing or malformed file, checks adapter names with one rule for
every plugin. Which plugins load a given directory is asked of the installed plugins' adapter
methods (``ftengine.methods.plugins_for_adapter``), so the core never needs to know a ``peft_type``.
"""

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .checkpoint import atomic_save_safetensors, atomic_write_text
from .errors import AdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT's on-disk tensor names are the model's own, under PeftModel's two wrapping levels.
KEY_PREFIX = "base_model.model."


# --------------------------------------------------------------------------------------------
# reading and writing
# --------------------------------------------------------------------------------------------


def read_adapter_config(path):
    """The ``adapter_config.json`` of the adapter directory ``path``, as a dict."""
    config_path = Path(path) / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{config_path}: not found; is {path} an adapter directory (saved by ftengine or PEFT)?") from None
    except OSError as exc:
        raise AdapterError(f"{config_path}: cannot read the adapter config ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise AdapterError(f"{config_path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{config_path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path}: expected a JSON object, found {type(config).__name__}")
    return config


def read_adapter_tensors(path):
    """``{on-disk key: tensor}`` from the ``adapter_model.safetensors`` of directory ``path``."""
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterError(f"{weights}: adapter weights not found; is {path} an adapter directory (saved by ftengine or PEFT)?")
    try:
        with safe_open(weights, framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise AdapterError(
            f"{weights}: not a readable safetensors file ({exc}); it may be truncated or empty: save the adapter again"
        ) from None


def write_adapter(path, adapter_config, tensors):
    """Write ``adapter_config`` and ``tensors`` into the directory ``path`` as PEFT does.

    :param adapter_config: the JSON-serialisable ``adapter_config.json`` contents.
    :param tensors: ``{on-disk key: tensor}``.
    :return: the two paths written.
    """
    path = Path(path)
    text = json.dumps(adapter_config, indent=2, sort_keys=True) + "\n"
    return [
        atomic_write_text(path / CONFIG_FILE, text),
        atomic_save_safetensors(path / WEIGHTS_FILE, tensors, metadata={"format": "pt"}),
    ]


# --------------------------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------------------------


def adapter_name_problem(name):
    """Why ``name`` cannot name an adapter, or ``None`` (for config validation messages)."""
    if not isinstance(name, str) or not name or "." in name:
        return f"{name!r} must be non-empty and without dots (it becomes part of parameter names)"
    return None


def check_adapter_name(name, loaded=(), path=None):
    """Raise ``AdapterError`` unless ``name`` can name a new adapter beside ``loaded`` ones.

    The one rule for every adapter plugin: a name is non-empty without dots (it becomes part of
    parameter names), and a second adapter under a name already loaded is refused rather than
    silently replacing or mixing with the first.
    """
    where = f"{path}: " if path is not None else ""
    if adapter_name_problem(name):
        raise AdapterError(f"{where}adapter name {adapter_name_problem(name)}")
    if name in loaded:
        raise AdapterError(f"{where}an adapter named '{name}' is already loaded; load this one under another name")


def short_target_names(selected, all_paths):
    """PEFT's ``target_modules`` for the module paths ``selected`` out of ``all_paths``: the
    distinct last path parts (``["q_proj", "v_proj"]``), as PEFT writes them, when those names
    select exactly ``selected``; otherwise the full paths (the short names would select more)."""
    names = sorted({p.rsplit(".", 1)[-1] for p in selected})
    if {p for p in all_paths if p.rsplit(".", 1)[-1] in names} == set(selected):
        return names
    return sorted(selected)
