"""Atomic file and directory writes, and training checkpoints.

Nothing is ever half-written: files go to a temporary name in the same directory, are flushed
and fsynced, then renamed over the target; a checkpoint directory is filled under a temporary
name and renamed into place only when complete. A run killed mid-save leaves the previous
checkpoint as it was.

A checkpoint (``<output_dir>/checkpoints/step-000006/``) holds:

* ``trainable.safetensors``: the trainable parameters only (a LoRA run stores just the adapter);
* ``optimizer.pt``: the optimiser state (tensors and numbers; read back with
  ``torch.load(weights_only=True)``, which refuses anything that would run code);
* ``rng.safetensors``: the torch and CUDA random states, as tensors;
* ``state.json``: step, scheduler state, tokens seen, the Python ``random`` state (as JSON), and
  ``healthy`` (false when the loop saw non-finite values); RNG state lets dropout and data order
  continue exactly as in an uninterrupted run;
* ``config.json``: the run's config, which ``--resume`` compares with its own;
* ``manifest.json``, written last: the size and sha256 of each other file. ``--resume`` verifies
  them (and that ``state.json``'s step is the directory's, and that the weights are finite) and
  falls back to the newest checkpoint that verifies. Checkpoints from before the manifest are
  checked for their files, step and finite weights only.

``state.json`` also records the sha256 of each training data file (``data_sha256``): ``--resume``
refuses to continue on data that changed since the run started. Hashing reads each file once
(about 1 GB/s on one core): next to writing the checkpoint or training on the data, small.

Nothing in a checkpoint is unpickled: a crafted checkpoint cannot run code. (Checkpoints from
older versions kept the RNG state in ``rng.pt``; it is read with ``weights_only=True`` too.)

Pruning keeps the newest ``keep`` checkpoints and, always, the newest *healthy* one, so a run
that went bad cannot prune the last good checkpoint. A write that fails (disk full, permission)
raises ``StorageError`` naming the path and the cause, and leaves the previous checkpoint as it was.
"""

import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import StorageError

CHECKPOINTS = "checkpoints"
PREFIX = "step-"
CONFIG_FILE = "config.json"
MANIFEST = "manifest.json"
#: What ``atomic_directory`` names a checkpoint while it is written (``tempfile.mkdtemp``: 8
#: random characters); a run killed then leaves one behind.
TEMPORARY = re.compile(rf"\.{PREFIX}\d{{6,}}\.[a-z0-9_]{{8}}\.tmp")


def no_space(exc):
    """Whether ``exc`` says the disk (or quota) is full, whatever library raised it."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


def storage_error(exc, path, what, kept=None):
    """A ``StorageError`` for a failed write of ``path``: names the cause and what was kept.

    :param what: what was being written ("checkpoint step 6", "the result").
    :param kept: a sentence about what is intact ("the previous checkpoint ... is intact").
    """
    if no_space(exc):
        cause, fix = "no space left on device", "free some space or set output_dir to a larger disk, then rerun"
    elif isinstance(exc, PermissionError):
        cause, fix = "permission denied", "choose an output_dir you can write to"
    elif isinstance(exc, OSError):
        cause, fix = exc.strerror or str(exc), "check the disk and the directory"
    else:
        cause, fix = str(exc), "check the disk and the directory"
    message = f"{path}: cannot write {what}: {cause}; {fix}"
    if kept:
        message += f". {kept}"
    return StorageError(message)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Write ``path`` atomically: ``write(tmp_path)`` fills a temp file that is then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes private files, and some writers (safetensors) recreate the file: give
        # the finished file the mode an ordinary write would.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as handle:
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path, text):
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_save_safetensors(path, tensors, metadata=None):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


@contextmanager
def atomic_directory(path):
    """Yield a temporary directory that replaces ``path`` only if the block completes.

    An existing ``path`` is replaced as a whole (moved aside, then deleted) so readers never
    see a mix of old and new files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        for child in tmp.iterdir():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def checkpoint_dirs(output_dir):
    """Complete checkpoints under ``output_dir``, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def read_state(path):
    """The ``state.json`` of checkpoint ``path`` (``{}`` if unreadable)."""
    try:
        return json.loads((Path(path) / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def is_healthy(path):
    """Whether checkpoint ``path`` was saved from finite weights (older checkpoints count as healthy)."""
    return read_state(path).get("healthy", True)


def latest_checkpoint(output_dir, healthy_only=True):
    """The newest complete (and, by default, healthy) checkpoint under ``output_dir``, or ``None``."""
    found = [p for p in checkpoint_dirs(output_dir) if not healthy_only or is_healthy(p)]
    return found[-1] if found else None


def prune(output_dir, keep):
    """Delete all but the newest ``keep`` checkpoints, never the newest healthy one."""
    found = checkpoint_dirs(output_dir)
    good = latest_checkpoint(output_dir)
    for old in found[:-keep] if keep else found:
        if old != good:
            shutil.rmtree(old, ignore_errors=True)


def remove_temporaries(output_dir):
    """Delete the half-written checkpoints a killed run left (``TEMPORARY`` directories only).

    Only for a run that holds ``output_dir``'s lock: no other run can be writing them.
    """
    root = Path(output_dir) / CHECKPOINTS
    if root.is_dir():
        for path in root.iterdir():
            if path.is_dir() and TEMPORARY.fullmatch(path.name):
                shutil.rmtree(path, ignore_errors=True)


def sha256_file(path):
    """The sha256 of the file ``path`` (hex), read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory):
    """Record the size and sha256 of every file in checkpoint ``directory`` in its ``MANIFEST``."""
    files = {
        path.name: {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        for path in sorted(Path(directory).iterdir())
        if path.is_file() and path.name != MANIFEST
    }
    (Path(directory) / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def _manifest_problem(path):
    """What in checkpoint ``path`` disagrees with its manifest, or ``None``."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is unreadable ({exc})"
    for name, recorded in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != recorded["bytes"]:
            return f"{name} is {size} bytes, the manifest says {recorded['bytes']} (truncated or rewritten)"
        if sha256_file(file) != recorded["sha256"]:
            return f"{name} does not match its sha256 in the manifest (changed after the checkpoint was written)"
    return None


def _nonfinite_tensor(path):
    """The name of a tensor of the safetensors file ``path`` holding NaN or infinity, or ``None``
    (read one tensor at a time)."""
    with safe_open(path, "pt") as tensors:
        for name in tensors.keys():  # noqa: SIM118 - safe_open is not a dict
            if not bool(torch.isfinite(tensors.get_tensor(name)).all()):
                return name
    return None


def verification_problem(path):
    """Why checkpoint ``path`` must not be resumed from, or ``None`` when it verifies.

    Checks the manifest (sizes and hashes; a checkpoint from before manifests: that its files
    exist), that ``state.json`` is readable, healthy and names the directory's step, and that
    the trainable weights are finite.
    """
    path = Path(path)
    if (path / MANIFEST).is_file():
        problem = _manifest_problem(path)
        if problem:
            return problem
    else:
        missing = [n for n in ("trainable.safetensors", "optimizer.pt", "state.json") if not (path / n).is_file()]
        if not ((path / "rng.safetensors").is_file() or (path / "rng.pt").is_file()):
            missing.append("rng.safetensors")
        if missing:
            return f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
    try:
        record = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as exc:
        return f"state.json is unreadable ({exc})"
    step = path.name[len(PREFIX) :]
    if not step.isdigit():
        return f"the directory is not named {PREFIX}<step>"
    step = int(step)
    if record.get("step") != step:
        return f"state.json says step {record.get('step')}, the directory step {step}"
    if not record.get("healthy", True):
        return "it is marked unhealthy (its weights were not finite when it was saved)"
    try:
        bad = _nonfinite_tensor(path / "trainable.safetensors")
    except (OSError, SafetensorError) as exc:
        return f"trainable.safetensors is unreadable ({exc})"
    if bad:
        return f"trainable.safetensors holds NaN or infinity ({bad}) though state.json marks it healthy"
    return None


def newest_verified(output_dir):
    """The newest checkpoint under ``output_dir`` that verifies (``verification_problem``).

    :return: ``(path or None, failed)``, ``failed`` a list of ``(path, problem)`` of the newer
        checkpoints that did not verify, newest first.
    """
    failed = []
    for path in reversed(checkpoint_dirs(output_dir)):
        problem = verification_problem(path)
        if problem is None:
            return path, failed
        failed.append((path, problem))
    return None, failed


def _rng_tensors():
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    return tensors


def _python_rng():
    version, internal, gauss_next = random.getstate()
    return [version, list(internal), gauss_next]


def save_checkpoint(
    output_dir, step, params, optimizer, scheduler, state, keep=2, healthy=True, config=None, optimizer_state=None
):
    """Write checkpoint ``step`` atomically and keep only the newest ``keep`` checkpoints (and
    the newest healthy one).

    :param params: ``{name: parameter}`` of the trainable parameters.
    :param state: JSON-serialisable run state (tokens seen, ...).
    :param healthy: ``False`` when the weights or the last steps were not finite: such a
        checkpoint is kept for inspection but never resumed from, and cannot cause the last
        healthy one to be pruned.
    :param config: the run's config as plain data, stored as ``config.json`` for ``--resume`` to compare.
    :param optimizer_state: the optimiser's ``state_dict()`` with whole tensors, saved instead of
        ``optimizer.state_dict()`` (a sharded run gathers it first; ``optimizer`` may then be ``None``).
    :raises StorageError: the write failed (disk full, ...); the previous checkpoint is intact.
    """
    target = Path(output_dir) / CHECKPOINTS / f"{PREFIX}{step:06d}"
    try:
        with atomic_directory(target) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, tmp / "trainable.safetensors")
            # A file object, not a path: torch then reports a full disk as OSError(ENOSPC).
            with open(tmp / "optimizer.pt", "wb") as handle:
                torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, handle)
            save_file(_rng_tensors(), tmp / "rng.safetensors")
            record = {
                "step": step,
                "scheduler": scheduler.state_dict(),
                **state,
                "healthy": bool(healthy),
                "python_rng": _python_rng(),
            }
            (tmp / "state.json").write_text(json.dumps(record, indent=1))
            if config is not None:
                (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1))
            write_manifest(tmp)  # last: it vouches for the files above
    except (OSError, SafetensorError, RuntimeError) as exc:
        previous = latest_checkpoint(output_dir, healthy_only=False)
        kept = f"The previous checkpoint {previous} is intact" if previous else "No earlier checkpoint existed"
        raise storage_error(exc, target, f"checkpoint step {step}", kept) from exc
    prune(output_dir, keep)
    return target


def checkpoint_config(path):
    """The config (plain data) recorded in checkpoint ``path``, or ``None`` for older checkpoints."""
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        return None
    return json.loads(config_path.read_text())


def _load_rng(path):
    """The torch/CUDA RNG tensors and the Python RNG state of checkpoint ``path``; nothing is unpickled."""
    record = read_state(path)
    if (path / "rng.safetensors").is_file():
        tensors = load_file(path / "rng.safetensors")
        cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
        python = record.get("python_rng")
        python = (python[0], tuple(python[1]), python[2]) if python else None
        return tensors["torch"], cuda, python
    if not (path / "rng.pt").is_file():
        raise StorageError(f"{path}: the checkpoint has no RNG state (rng.safetensors); it is incomplete")
    rng = safe_torch_load(path / "rng.pt")  # checkpoints from before rng.safetensors
    return rng["torch"], rng.get("cuda", []), rng["python"]


def safe_torch_load(path):
    """``torch.load(path, weights_only=True)``, with a message instead of a traceback when the
    file holds something else than tensors and numbers (a crafted pickle) or is damaged."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise StorageError(
            f"{path}: refused to load: it holds objects other than tensors and numbers, which could run "
            f"code when unpickled ({str(exc).splitlines()[0][:120]}). Do not resume from a checkpoint you did not write"
        ) from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise StorageError(f"{path}: cannot read it ({exc}); the checkpoint is damaged, resume from an earlier one") from None


def load_checkpoint(path, params, optimizer, scheduler, load_param=None, load_optimizer_state=None):
    """Restore trainable parameters, optimiser, scheduler and RNG from checkpoint ``path``.

    :param load_param: ``load_param(param, tensor)`` sets a parameter from its whole saved
        tensor (default ``param.copy_``; a sharded run keeps its shard of it).
    :param load_optimizer_state: ``load_optimizer_state(optimizer, state_dict)`` (default
        ``optimizer.load_state_dict``; a sharded run shards the whole tensors).

    :return: the checkpoint's ``state.json`` contents.
    :raises ValueError: if the checkpoint's parameters are not exactly the trainable ones.
    """
    path = Path(path)
    tensors = load_file(path / "trainable.safetensors")
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not match this run's trainable parameters "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); resume with the same plugins and config"
        )
    with torch.no_grad():
        for name, param in params.items():
            (load_param or torch.Tensor.copy_)(param, tensors[name])
    torch_rng, cuda_rng, python_rng = _load_rng(path)
    (load_optimizer_state or torch.optim.Optimizer.load_state_dict)(optimizer, safe_torch_load(path / "optimizer.pt"))
    record = json.loads((path / "state.json").read_text())
    scheduler.load_state_dict(record["scheduler"])
    torch.set_rng_state(torch_rng)
    if python_rng is not None:
        random.setstate(python_rng)
    if cuda_rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_rng)
    return record


# --------------------------------------------------------------------------------------------
# resume: is the config still the one the checkpoint was trained with?
# --------------------------------------------------------------------------------------------

#: Keys a resumed run may change: they do not change what the steps so far computed.
RESUME_SAFE_KEYS = {
    "output_dir": "the run directory moved",
    "train.max_steps": "the run is extended or shortened; the learning-rate schedule follows the new total",
    "train.epochs": "the run is extended or shortened; the learning-rate schedule follows the new total",
    "train.save_every": "checkpoint interval",
    "train.log_every": "logging interval",
    "train.eval_every": "evaluation interval",
    "train.eval_batch_size": "evaluation batch size",
    "data.eval": "evaluation data",
    "train.on_nonfinite": "what happens on a NaN/inf step",
    "train.max_nonfinite_skips": "what happens on a NaN/inf step",
    "train.gradient_checkpointing": "memory only; the same gradients",
    "train.device": "where the run computes",
    "train.dist_timeout_s": "how long ranks wait for each other",
}


def _flatten(data, prefix=""):
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def compare_configs(saved, current, resume_safe_plugins=(), resume_safe_keys=RESUME_SAFE_KEYS):
    """Compare a checkpoint's config with the resuming run's (both plain data).

    :return: ``(errors, accepted)``: lists of ``(key, saved value, current value)``. ``errors``
        are changes to what is trained (model, method sections, data, batch, schedule, seed);
        ``accepted`` are the changes in ``resume_safe_keys``.
    :param resume_safe_plugins: plugins that may be added or dropped on resume (those that
        spread the run over processes: a checkpoint is the same whatever the world size).
    :param resume_safe_keys: the keys that may change: the core's ``RESUME_SAFE_KEYS``, plus
        what the plugin sections declare (``config.resume_safe_keys``).
    """
    old, new = _flatten(saved), _flatten(current)
    for flat in (old, new):  # the order plugins were named in does not matter
        if isinstance(flat.get("plugins"), list):
            flat["plugins"] = sorted(p for p in flat["plugins"] if p not in resume_safe_plugins)
    errors, accepted = [], []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, "(not set)"), new.get(key, "(not set)")
        if before == after:
            continue
        (accepted if key in resume_safe_keys else errors).append((key, before, after))
    return errors, accepted
