"""Several processes, one run: the process group, the few collectives the loop needs, and the
single-process default of what a parallelism plugin provides.

    with process_group(config) as world:         # torchrun set WORLD_SIZE > 1: gloo or NCCL
        parallel = world.parallelize(model, ...)  # a plugin's ftengine_parallelize, or Parallel(model)
        loss_sum, count = world.sum([loss_sum, count])

A run is distributed when it was started by ``torch.distributed.run`` (``ftengine run --nproc
N`` execs it; plain ``torchrun -m ftengine.cli run ...`` works too): ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK`` are in the environment. The core then creates the process group (gloo on CPU,
NCCL on CUDA with the device ``cuda:LOCAL_RANK``, timeout ``train.dist_timeout_s``) and
destroys it however the run ends. Rank 0 alone writes (metrics, checkpoints, ``final/``) and
holds the ``output_dir`` lock; the other ranks wait for it at a barrier.

Everything a parallelism plugin changes lives behind ``Parallel``; its default here is the
single process, where each method is a no-op, so the loop reads the same in both cases.
"""

import math
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch

from .errors import ConfigError, FtengineError


class RaisedOnMain(FtengineError):
    """An error rank 0 raised, and reports, in work done for every rank: the other ranks stop
    with it too, without printing it again."""

    quiet = True


def launched_world_size():
    """The number of processes ``torch.distributed.run`` started for this run (1 when none did)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class World:
    """This process's place in the run: ``rank`` of ``size`` processes, and its ``device``."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device | None = None

    @property
    def is_main(self):
        """Whether this process writes the run's files (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self):
        return self.size > 1

    def _reduce_device(self):
        return self.device if self.device is not None and self.device.type == "cuda" else torch.device("cpu")

    def sum(self, values):
        """``values`` (numbers) summed over every rank, as floats (float64: counts stay exact)."""
        if not self.distributed:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._reduce_device())
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def max(self, value):
        """The largest of every rank's ``value`` (an int): all ranks then decide alike."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self._reduce_device())
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return int(tensor.item())

    def barrier(self):
        if self.distributed:
            torch.distributed.barrier()

    def broadcast(self, value):
        """Rank 0's ``value`` (any picklable object), on every rank."""
        if not self.distributed:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, work):
        """Run ``work()`` on rank 0 only and return its result on every rank. An exception it
        raises is raised on rank 0 and, as ``RaisedOnMain`` with its message, on the others:
        no rank waits for a write that failed."""
        if not self.distributed:
            return work()
        result, error = None, None
        if self.is_main:
            try:
                result = work()
            except Exception as exc:  # re-raised below, after the others heard of it
                error = exc
        result, message = self.broadcast((result, None if error is None else str(error)))
        if error is not None:
            raise error
        if message is not None:
            raise RaisedOnMain(message)
        return result

    def share(self, items):
        """This rank's contiguous share of ``items`` (a global batch): rank r of N takes the r-th
        of N nearly equal slices, so N processes together see exactly the rows one would."""
        per_rank, extra = divmod(len(items), self.size)
        start = self.rank * per_rank + min(self.rank, extra)
        return items[start : start + per_rank + (1 if self.rank < extra else 0)]


@contextmanager
def process_group(config):
    """The run's ``World``; with ``WORLD_SIZE`` > 1, a process group created for the block and
    destroyed on every way out of it (errors and signals included)."""
    size = launched_world_size()
    if size <= 1:
        yield World()
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = config.train.device != "cpu" and torch.cuda.is_available()
    if config.train.device == "cuda" and not cuda:
        raise ConfigError(["train.device: 'cuda' was asked for but no CUDA device is available; use 'auto' or 'cpu'"])
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    torch.distributed.init_process_group(
        backend="nccl" if cuda else "gloo",
        timeout=timedelta(seconds=config.train.dist_timeout_s),
        device_id=device if cuda else None,
    )
    try:
        yield World(rank=rank, size=size, local_rank=local_rank, device=device)
        # Every rank is done before any tears the group down: a gloo rank whose peer closed its
        # connections first can abort at exit ("terminate called without an active exception").
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


class Parallel:
    """How the loop trains a model over several processes; this base class is the single
    process, where every method is a no-op. A parallelism plugin's ``ftengine_parallelize``
    returns a subclass.

    ``model`` is what the loss is computed with (a ``DistributedDataParallel`` wrapper, say); a
    wrapper exposes the model it wraps as ``.module``, as torch's do (``modeling.inner_model``).
    ``unwrap()`` is the model itself, for everything else (evaluation, saving, hooks).
    """

    def __init__(self, model):
        self.model = model

    def unwrap(self):
        """The model without the parallel wrapper (its parameters may still be shards)."""
        return self.model

    def store_frozen_weights_in(self, dtype):
        """Keep the frozen linear weights in the autocast ``dtype`` (``None``: as loaded), so that
        autocast does not cast them anew at every forward (``modeling.store_frozen_weights_in``).
        A subclass whose processes share weights by units of one dtype (sharding) keeps them as
        loaded instead."""
        from .modeling import store_frozen_weights_in  # modeling imports data, which imports this module

        store_frozen_weights_in(self.unwrap(), dtype)

    def no_sync(self):
        """A context for the backward passes of all but the last micro-batch of a step: the
        gradients accumulate locally and are synchronised once, on the last."""
        return nullcontext()

    @contextmanager
    def full_model(self):
        """A block in which ``unwrap()``'s parameters are whole tensors (a sharded model is
        gathered on every rank, and sharded again after): for saving. Every rank enters it."""
        yield self.unwrap()

    def full_optimizer_state(self, optimizer):
        """The optimiser's ``state_dict()`` with whole tensors, as one process would have it.
        A collective: every rank calls it."""
        return optimizer.state_dict()

    def load_param(self, param, tensor):
        """Set a trainable parameter (a shard, maybe) from the whole ``tensor``."""
        param.copy_(tensor)

    def load_optimizer_state(self, optimizer, state):
        """Load an optimiser ``state_dict()`` of whole tensors (from any world size)."""
        optimizer.load_state_dict(state)

    def grad_norm(self, params, max_norm):
        """Clip the gradients of ``params`` to ``max_norm`` (``None``: no clipping) and return
        their total norm before clipping, over the whole model, as a float."""
        norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm if max_norm else math.inf)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def parallelize(pm, model, params, config, world):
    """The ``Parallel`` of the run: an active plugin's ``ftengine_parallelize``, or the single
    process. Several processes with no plugin to synchronise them would train apart."""
    parallel = pm.hook.ftengine_parallelize(model=model, params=params, config=config, world=world)
    if parallel is None:
        if world.distributed:
            raise ConfigError([no_parallel_plugin_message(world.size)])
        parallel = Parallel(model)
    return parallel


def parallel_plugin_names():
    """The installed plugins that implement ``ftengine_parallelize``: a run may resume with
    another of them, or none (checkpoints do not depend on the world size)."""
    from .pluginmanager import all_plugins_manager

    pm = all_plugins_manager()
    return sorted(pm.get_name(impl.plugin) for impl in pm.hook.ftengine_parallelize.get_hookimpls())


def no_parallel_plugin_message(size):
    """The error for a run on several processes that no active plugin parallelises."""
    names = parallel_plugin_names()
    fix = " or ".join(f"--plugin {name}" for name in names) or "a plugin that implements ftengine_parallelize"
    return f"the run has {size} processes but no active plugin synchronises them (each would train its own model): add {fix}"


def local_batch(datasets, world, examples):
    """``(batch, weight)``: this rank's share of a global batch, collated. A rank whose share
    is empty still runs a forward and backward pass with the others (they synchronise), over
    the batch's first row with weight 0: it then adds nothing to any sum."""
    mine = world.share(examples)
    return (datasets.collate(mine), 1.0) if mine else (datasets.collate(examples[:1]), 0.0)
