"""Ownership of a run's ``output_dir``: one run at a time, and never over an earlier run by accident.

    with claim_output_dir(config.output_dir, resume=False, overwrite=False) as run_dir:
        ...  # train; run_dir.path is the directory, the lock is held until the block ends

* **A lock held for the run's life.** ``<output_dir>/.ftengine.lock`` is locked with
  ``fcntl.flock`` and holds the owner's pid. A second run into the same directory is refused at
  once, naming that pid. The kernel drops the lock when its process dies, however it dies
  (``kill -9`` included), so a lock file left by a dead run is simply taken over. The file is
  left in place when the run ends (unlinking a lock file others may have opened races).
* **A fresh run does not reuse an earlier run's directory.** If ``output_dir`` holds checkpoints
  or a ``final/`` result, a run without ``--resume`` is refused with the two ways on:
  ``--resume`` (continue it) or ``--overwrite`` (start again).
* **``--overwrite`` moves, never deletes.** The earlier run's files (``config.json``,
  ``metrics.jsonl``, ``checkpoints/``, ``final/``, ...) are moved into
  ``<output_dir>/replaced-<time>/``, which the user deletes when it is no longer needed. Files
  that are not a run's are never touched.
* **A run writes only where nothing else lives.** Before anything is created (and before the
  model loads), an ``output_dir`` that is, holds or lies inside the model directory or a data
  path is refused (paths compared resolved: symbolic links and ``..`` followed). So is one whose
  run files are not a run's: a ``config.json`` is a run's only in the shape the core writes
  (an object with the core keys ``model``, ``output_dir``, ``train``...; a model's or an app's
  has other keys), a ``metrics.jsonl`` only if its first record has a ``step``, a
  ``checkpoints/`` only if it holds a ``step-*`` checkpoint (or its temporary), and ``final/``,
  ``report.png`` and the plugins' files only beside a run's ``config.json`` (every run writes it
  before any of them). ``--overwrite`` does not change this: it moves a run aside, never a
  user's files.
* **Run files are never symbolic links.** A link among them (``config.json -> ~/notes``) is
  refused, naming it; the lock and ``metrics.jsonl`` are opened with ``O_NOFOLLOW``, so a link
  planted later is an error too, never a write through to its target.
"""

import errno
import fcntl
import glob
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import RunDirError

LOCK_FILE = ".ftengine.lock"
#: What the core writes into a run's output_dir; --overwrite moves these aside, and what the
#: plugins name (hook ``ftengine_run_files``).
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints", "final", "report.png")
REPLACED_PREFIX = "replaced-"
#: What a checkpoints/ directory of a run holds: checkpoints and their temporaries (``atomic_directory``).
CHECKPOINT_ENTRY = re.compile(r"^(step-\d+|\.step-\d+\..+\.tmp|\.step-\d+\.old)$")
#: Keys every config.json the core writes holds (``dump_config``); a model's or an app's has others.
RUN_CONFIG_KEYS = {"model", "output_dir", "plugins", "data", "train"}


@dataclass
class RunDir:
    """A claimed output directory: ``path``, and where ``--overwrite`` moved the earlier run."""

    path: Path
    moved_to: Path | None = None
    stale_pid: int | None = None


def _read_pid(handle):
    handle.seek(0)
    text = handle.read().strip()
    return int(text) if text.isdigit() else None


def run_inputs(config):
    """The local paths a run reads, by config key: the model and the data. Hub ids and
    ``default`` are not local paths and are left out."""
    named = {"model": config.model, "data.train": config.data.train, "data.eval": config.data.eval}
    named |= {f"data.eval_sets.{name}": spec for name, spec in config.data.eval_sets.items()}
    return {key: Path(spec) for key, spec in named.items() if spec and Path(spec).exists()}


def _input_name(key, path):
    if key == "model":
        return "the model directory" if path.is_dir() else "the model file"
    return "the training data" if key == "data.train" else "the evaluation data"


def _refuse_overlap(path, inputs):
    """Refuse an output_dir that is, holds or lies inside one of ``inputs`` ({key: path})."""
    out = path.expanduser().resolve()
    found = []
    for key, source in inputs.items():
        resolved = source.expanduser().resolve()
        if out == resolved:
            relation = "is"
        elif out in resolved.parents:
            relation = "contains"
        elif resolved.is_dir() and resolved in out.parents:
            relation = "lies inside"
        else:
            continue
        found.append(f"{relation} {_input_name(key, resolved)} ({key}: {source})")
    if found:
        raise RunDirError(
            f"output_dir {path}: {'; '.join(found)}, where the run would write its files; "
            f"choose an output_dir outside it, such as runs/<name>"
        )


def _refuse_links(path, names):
    """Refuse run files that are symbolic links: the run would write through them."""
    for name in names:
        item = path / name
        if item.is_symlink():
            raise RunDirError(
                f"{item}: is a symbolic link (to {os.readlink(item)}), and a run writes its files only in output_dir; "
                f"remove the link, or choose another output_dir"
            )


def _is_run_config(path):
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.keys() >= RUN_CONFIG_KEYS


def _is_run_metrics(path):
    try:
        with open(path) as handle:
            first = handle.readline()
        if not first.strip():
            return True  # empty: nothing to lose
        record = json.loads(first)
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "step" in record


def _is_run_checkpoints(path):
    """A run's ``checkpoints/`` holds a checkpoint or its temporary (or nothing yet); what else
    it holds is never written over (pruning removes ``step-*`` directories only)."""
    entries = list(path.iterdir()) if path.is_dir() else None
    return entries is not None and (not entries or any(CHECKPOINT_ENTRY.match(e.name) for e in entries))


def foreign_files(path, names):
    """Which of ``names`` in ``path`` exist and are not an earlier run's (see the module doc)."""
    beside_run_config = _is_run_config(path / "config.json")
    recognise = {"config.json": lambda _: beside_run_config, "metrics.jsonl": _is_run_metrics, "checkpoints": _is_run_checkpoints}
    foreign = []
    for name in names:
        item = path / name
        if item.exists() and not recognise.get(name, lambda _: beside_run_config)(item):
            foreign.append(f"{name}/" if item.is_dir() else name)
    return foreign


def _refuse_foreign(path, names):
    foreign = foreign_files(path, names)
    if foreign:
        raise RunDirError(
            f"output_dir {path}: holds files that are not an ftengine run's, which the run would write over: "
            f"{', '.join(foreign)}. Move them elsewhere, or choose another output_dir (--overwrite moves only a run's files)"
        )


def _prepare_dir(path):
    """Create ``path`` (and parents); explain a file in the way or a permission problem."""
    if path.exists() and not path.is_dir():
        raise RunDirError(f"output_dir {path}: is a file, not a directory; set output_dir to a directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunDirError(f"output_dir {path}: a parent of it is a file, not a directory; choose another output_dir") from None
    except OSError as exc:
        raise RunDirError(f"output_dir {path}: cannot create it ({exc.strerror}); choose a directory you can write to") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunDirError(f"output_dir {path}: not writable (permission denied); choose a directory you can write to")


def _lock(path):
    """Open and flock the lock file; return the open handle. Refuse if another process holds it."""
    lock_path = path / LOCK_FILE
    try:
        handle = open_run_file(lock_path, "a+")  # held open for the run's life
    except OSError as exc:
        raise RunDirError(
            f"{lock_path}: cannot open the run lock ({exc.strerror}); choose a directory you can write to"
        ) from None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _read_pid(handle)
        handle.close()
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunDirError(f"{lock_path}: cannot lock the output directory ({exc.strerror})") from None
        who = f"pid {holder}" if holder else "another process"
        raise RunDirError(
            f"output_dir {path}: another ftengine run ({who}) is using it; wait for it to finish, "
            f"stop it, or choose another output_dir"
        ) from None
    return handle


def open_run_file(path, mode="a"):
    """Open the run file ``path`` for appending (``mode`` "a", or "a+" to read too), creating it,
    never through a symbolic link (``O_NOFOLLOW``): a planted link is an error, not a write to
    its target."""
    flags = os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_RDWR if "+" in mode else os.O_WRONLY)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        _refuse_links(Path(path).parent, [Path(path).name])
        raise
    return os.fdopen(fd, mode)


def _write_pid(handle):
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    os.fsync(handle.fileno())


def earlier_run(path):
    """What of an earlier run ``path`` holds that a fresh run must not mix with: a list of
    names (``checkpoints/step-000004``, ``final/``); empty when there is none."""
    found = []
    checkpoints = path / "checkpoints"
    if checkpoints.is_dir():
        steps = sorted(p.name for p in checkpoints.iterdir() if p.is_dir() and p.name.startswith("step-"))
        if steps:
            found.append(f"checkpoints/{steps[-1]}" + (f" (and {len(steps) - 1} older)" if len(steps) > 1 else ""))
    if (path / "final").exists():
        found.append("final/")
    return found


def move_run_aside(path, plugin_files=()):
    """Move an earlier run's files (``RUN_FILES``, ``plugin_files`` and their leftover
    temporaries) into ``<path>/replaced-<time>/``; return that directory, or ``None`` if there
    was nothing."""
    names = list(dict.fromkeys((*RUN_FILES, *plugin_files)))
    present = [path / name for name in names if (path / name).exists()]
    # The temporaries of checkpoint.atomic_write / atomic_directory: .<name>.<random>.tmp, .<name>.old
    for name in names:
        present += [*path.glob(f".{glob.escape(name)}.*.tmp"), *path.glob(f".{glob.escape(name)}.old")]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path / f"{REPLACED_PREFIX}{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = path / f"{REPLACED_PREFIX}{stamp}-{n}"
    target.mkdir()
    for item in present:
        os.replace(item, target / item.name)
    return target


@contextmanager
def claim_output_dir(output_dir, resume=False, overwrite=False, plugin_files=(), inputs=None):
    """Own ``output_dir`` for the duration of the block; yield a ``RunDir``.

    :param resume: the run continues the one in ``output_dir`` (its files are expected).
    :param overwrite: a fresh run may replace an earlier one: its files are moved into
        ``replaced-<time>/`` inside ``output_dir``.
    :param plugin_files: what the run's plugins write into ``output_dir``, moved aside too.
    :param inputs: ``{config key: path}`` the run reads (``run_inputs``), which ``output_dir``
        must neither be, hold nor lie inside.
    :raises RunDirError: ``output_dir`` is a file or not writable, overlaps ``inputs``, holds run
        files that are symbolic links or not a run's, another run holds it, or a fresh run
        (neither ``resume`` nor ``overwrite``) would mix with an earlier run.
    """
    path = Path(output_dir)
    _refuse_overlap(path, inputs or {})
    if path.is_dir():  # checked before anything is created in it
        run_files = list(dict.fromkeys((*RUN_FILES, *plugin_files)))
        _refuse_links(path, [LOCK_FILE, *run_files])
        _refuse_foreign(path, run_files)
    _prepare_dir(path)
    handle = _lock(path)
    try:
        previous = _read_pid(handle)
        run_dir = RunDir(path=path, stale_pid=previous if previous and previous != os.getpid() else None)
        _write_pid(handle)
        if not resume:
            found = earlier_run(path)
            if found and not overwrite:
                resume_hint = "Continue it with --resume, or start" if found[0].startswith("checkpoints") else "Start"
                raise RunDirError(
                    f"output_dir {path}: holds an earlier run ({', '.join(found)}). {resume_hint} again with --overwrite "
                    f"(moves the earlier run into {path / (REPLACED_PREFIX + '<time>')}/), or choose another output_dir"
                )
            if overwrite:
                run_dir.moved_to = move_run_aside(path, plugin_files)
        yield run_dir
    finally:
        try:
            handle.seek(0)
            handle.truncate()
        except OSError:
            pass
        handle.close()  # releases the flock
