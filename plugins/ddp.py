"""Data parallelism with ``torch.nn.parallel.DistributedDataParallel``: every rank holds the
whole model and trains on its share of each global micro-batch; gradients are averaged over
the ranks once per optimiser step.

    ftengine run job.yaml --plugin lora --plugin ddp --nproc 2

The run must be launched on several processes (``--nproc``, or ``torchrun -m ftengine.cli
run ...``); on one process the plugin does nothing. Only the trainable parameters are
synchronised (a LoRA run all-reduces just the adapters); frozen weights, 4-bit ones included,
are never sent. Buffers are not broadcast on each forward: every rank builds them alike. See
``docs/distributed.md``.
"""

from ftengine import hookimpl
from ftengine.distributed import Parallel
from torch.nn.parallel import DistributedDataParallel

conflicts = ("fsdp",)


class DdpParallel(Parallel):
    """The model inside ``DistributedDataParallel``; checkpoints need no gathering (every rank
    holds whole tensors)."""

    def __init__(self, model, world):
        cuda = world.device is not None and world.device.type == "cuda"
        super().__init__(
            DistributedDataParallel(
                model,
                device_ids=[world.device] if cuda else None,
                # Buffers (rotary tables) are built alike on every rank: broadcasting them would
                # make every forward a collective, evaluation and the DPO reference included.
                broadcast_buffers=False,
            )
        )

    def unwrap(self):
        return self.model.module

    def store_frozen_weights_in(self, dtype):
        pass  # every rank's weights stay as loaded, as FSDP's must

    def no_sync(self):
        return self.model.no_sync()


@hookimpl
def ftengine_parallelize(model, world):
    if world.size <= 1:
        return None
    return DdpParallel(model, world)
