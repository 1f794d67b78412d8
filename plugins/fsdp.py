"""Sharded data parallelism with FSDP2 (``torch.distributed.fsdp.fully_shard``): each rank
keeps a 1/N shard of every parameter, gradient and optimiser state, and gathers a decoder
layer's weights only while it computes that layer.

    ftengine run job.yaml --plugin lora --plugin fsdp --nproc 2

``fully_shard`` is applied to each decoder layer (the classes the model lists in
``_no_split_modules``), then to the root, which holds what is left (embeddings, final norm,
output head, a prompt-tuning wrapper's virtual tokens). A layer's frozen base weights and its
trainable adapters are in the same unit. Gradients are reduce-scattered (averaged) once per
optimiser step. Checkpoints and ``final/`` hold whole tensors, gathered from the shards, in
the format a single process writes, so any world size resumes them.

Refused: ``qlora`` (bitsandbytes keeps a 4-bit weight as a packed ``uint8`` tensor whose
quantisation state, per-block scales included, lives beside it, not in it; FSDP2 would shard
the packed bytes and not the state, and the shards could not be dequantised); ``dpo`` with
``full`` (its reference is a frozen deep copy of the model, which would copy the shards and
their hooks). See ``docs/distributed.md``.
"""

from contextlib import contextmanager

import torch
from ftengine import hookimpl
from ftengine.distributed import Parallel
from ftengine.pluginmanager import plugin_attribute
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

conflicts = ("ddp",)
#: Each process holds a shard of every parameter: a plugin that copies the whole model (a
#: frozen reference) cannot, once it is sharded.
shards_parameters = True


def decoder_layers(model):
    """The modules to shard one by one: instances of the classes ``model._no_split_modules``
    names (transformers models list their decoder layer there), in module order."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def _whole(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _shard_like(param, tensor):
    """This rank's shard of the whole ``tensor``, laid out as ``param`` (no communication)."""
    tensor = tensor.to(device=param.device, dtype=param.dtype)
    return distribute_tensor(tensor, param.device_mesh, param.placements, src_data_rank=None)


def whole_state_dict(model):
    """``model``'s parameters and persistent buffers by name, read from the modules (while the
    units are gathered: whole tensors), bypassing the state-dict hooks."""
    state = {name: param.detach() for name, param in model.named_parameters(remove_duplicate=False)}
    for name, buffer in model.named_buffers(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        if leaf not in model.get_submodule(owner)._non_persistent_buffers_set:
            state[name] = buffer.detach()
    return state


class FsdpParallel(Parallel):
    """The model sharded in place: ``model`` and ``unwrap()`` are the same object."""

    def __init__(self, model, world):
        super().__init__(model)
        mesh = init_device_mesh(world.device.type if world.device is not None else "cpu", (world.size,))
        self.units = decoder_layers(model)
        for layer in self.units:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.units.append(model)

    def store_frozen_weights_in(self, dtype):
        pass  # sharding keeps one dtype per unit: the weights stay as loaded

    @contextmanager
    def no_sync(self):
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    @contextmanager
    def full_model(self):
        """Every unit gathered; ``state_dict()`` then returns the whole tensors too (FSDP2's own
        hook would hand back the shards), so a plugin that saves with ``save_pretrained`` works."""
        for unit in self.units:
            unit.unshard()
        self.model.state_dict = lambda *args, **kwargs: whole_state_dict(self.model)
        try:
            yield self.model
        finally:
            del self.model.state_dict
            for unit in self.units:
                unit.reshard()

    def full_optimizer_state(self, optimizer):
        saved = optimizer.state_dict()
        state = {
            index: {key: _whole(value).cpu() if torch.is_tensor(value) else value for key, value in values.items()}
            for index, values in saved["state"].items()
        }
        return {"state": state, "param_groups": saved["param_groups"]}

    def load_param(self, param, tensor):
        param.copy_(_shard_like(param, tensor) if isinstance(param, DTensor) else tensor)

    def load_optimizer_state(self, optimizer, state):
        optimizer.load_state_dict(state)
        for param, values in optimizer.state.items():
            if isinstance(param, DTensor):
                for key, value in values.items():
                    if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == param.shape:
                        values[key] = _shard_like(param, value)


@hookimpl
def ftengine_validate(active):
    # FSDP2 shards the base weights as loaded; a plugin that changes the base (a quantiser's
    # 4-bit weights: packed bytes with their state beside them) leaves nothing it can shard.
    return [
        f"plugins '{name}' and 'fsdp': '{name}' changes the base weights (changes_base), which FSDP2 cannot "
        f"shard as they are stored; use --plugin ddp with '{name}'"
        for name in sorted(active)
        if plugin_attribute(name, "changes_base", False)
    ]


@hookimpl
def ftengine_parallelize(model, world):
    if world.size <= 1:
        return None
    return FsdpParallel(model, world)
