"""Atomic file and directory writes, and training checkpoints.

Nothing is ever half-written: files go to a temporary name in the same directory, are flushed
and fsynced, then renamed over the target; a checkpoint directory is filled under a temporary
name and renamed into place only when complete. A run killed mid-save leaves the previous
checkpoint as it was.

A checkpoint (``<output_dir>/checkpoints/step-000006/``) holds:

* ``trainable.safetensors``: the trainable parameters only (a LoRA run stores just the adapter);
* ``optimizer.pt``: the optimiser state;
* ``state.json``: step, scheduler state, tokens seen;
* ``rng.pt``: the torch, Python and CUDA random states, so dropout and data order continue
  exactly as in an uninterrupted run.
"""

import json
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
PREFIX = "step-"


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


def save_checkpoint(output_dir, step, params, optimizer, scheduler, state, keep=2):
    """Write checkpoint ``step`` atomically and keep only the newest ``keep`` checkpoints.

    :param params: ``{name: parameter}`` of the trainable parameters.
    :param state: JSON-serialisable run state (tokens seen, ...).
    """
    target = Path(output_dir) / CHECKPOINTS / f"{PREFIX}{step:06d}"
    with atomic_directory(target) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        record = {"step": step, "scheduler": scheduler.state_dict(), **state}
        (tmp / "state.json").write_text(json.dumps(record, indent=1))
    for old in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path, params, optimizer, scheduler):
    """Restore trainable parameters, optimiser, scheduler and RNG from checkpoint ``path``.

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
            param.copy_(tensors[name])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    record = json.loads((path / "state.json").read_text())
    scheduler.load_state_dict(record["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return record
