"""Adapter directories, for every adapter plugin: PEFT's two files, names, and who loads what.

An adapter directory holds what PEFT writes and reads::

    adapter_config.json          {"peft_type": "LORA", "r": 16, "target_modules": ["q_proj", ...], ...}
    adapter_model.safetensors    tensors keyed "base_model.model.<module path>.<name>", metadata {"format": "pt"}

An adapter plugin builds the config dict and the tensors; this module writes them atomically
(each file appears whole or not at all, mode 0644 under the usual umask), reads them back with
one ``AdapterError`` for a missing or malformed file, checks adapter names with one rule for
every plugin. Which plugins load a given directory is asked of the installed plugins' adapter
methods (``ftengine.methods.plugins_for_adapter``), so the core never needs to know a ``peft_type``.

Beside PEFT's files, ``ftengine_base.json`` records the base model an adapter was trained on:
its name and a fingerprint of its weights as loaded (before quantisation or adapters). Loading
the adapter over a base with another fingerprint warns, or with ``strict`` refuses: the shapes
may fit, yet the adapter was not trained for those weights. PEFT ignores the file; adapters
without it (made by PEFT) load unchecked.
"""

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import atomic_save_safetensors, atomic_write_text
from .errors import AdapterError
from .log import note, warn

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BASE_FILE = "ftengine_base.json"
# Values sampled from each base tensor for its fingerprint: enough to tell two trainings of
# one architecture apart, cheap for any model size.
FINGERPRINT_SAMPLES = 16
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
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise AdapterError(
            f"{weights}: not a readable safetensors file ({exc}); it may be truncated or empty: save the adapter again"
        ) from None
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise AdapterError(
                f"{weights}: tensor '{key}' has dtype {str(tensor.dtype).removeprefix('torch.')}; adapter weights are "
                f"floating point (the file was not written by ftengine or PEFT): save the adapter again"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterError(
                f"{weights}: tensor '{key}' holds NaN or infinite weights; the adapter is broken (a run that diverged, "
                f"e.g. with too high a learning rate): use an earlier checkpoint or train again"
            )
    return tensors


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
# the base an adapter was trained on
# --------------------------------------------------------------------------------------------


def base_fingerprint(model):
    """A short hash of ``model``'s weights: every tensor's name, shape and dtype, and
    ``FINGERPRINT_SAMPLES`` evenly spaced values of each. Deterministic, and cheap at any size."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        count = min(FINGERPRINT_SAMPLES, flat.numel())
        picks = [i * (flat.numel() - 1) // max(count - 1, 1) for i in range(count)]
        digest.update(f"{name}|{list(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(flat[picks].to("cpu", torch.float64).numpy().tobytes())
    return digest.hexdigest()[:16]


def record_base(model, name):
    """Remember on ``model``, just loaded, which base it is (``name`` as the user gave it)."""
    model.ftengine_base = {"base_model_name_or_path": name, "fingerprint": base_fingerprint(model)}


def write_base(path, model):
    """Write ``ftengine_base.json`` into the adapter directory ``path`` when ``model`` knows its
    base (``record_base``); return the paths written."""
    base = getattr(model, "ftengine_base", None)
    if base is None or not (Path(path) / CONFIG_FILE).is_file():
        return []
    return [atomic_write_text(Path(path) / BASE_FILE, json.dumps(base, indent=2, sort_keys=True) + "\n")]


def check_base(path, model, strict=False):
    """Warn when the adapter directory ``path`` was trained on another base than ``model``'s;
    with ``strict``, raise ``AdapterError`` instead (and note an adapter that cannot be checked)."""
    ours = getattr(model, "ftengine_base", None)
    base_file = Path(path) / BASE_FILE
    try:
        theirs = json.loads(base_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        theirs = None
    if not isinstance(theirs, dict) or "fingerprint" not in theirs or ours is None:
        if strict:
            note(f"note: {path}: cannot check which base model this adapter was trained on (no readable {BASE_FILE})")
        return
    if theirs["fingerprint"] == ours["fingerprint"]:
        return
    message = (
        f"{path}: this adapter was trained on base model '{theirs.get('base_model_name_or_path')}' "
        f"(fingerprint {theirs['fingerprint']}), but the base model now is '{ours['base_model_name_or_path']}' "
        f"(fingerprint {ours['fingerprint']}); the shapes fit, yet its output will not be what it was trained for"
    )
    if strict:
        raise AdapterError(f"{message}: load it over the base model it was trained on (--model)")
    warn(f"{message}. Use the base it was trained on; --strict refuses such adapters")


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
