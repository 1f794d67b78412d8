"""The hooks the ``lora`` plugin adds, so other plugins can extend LoRA without the core
knowing about it. ``lora`` adds them through ``ftengine_addhooks``; implement them with
``@ftengine.hookimpl`` in a plugin that ``requires = ("lora",)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ftengine.hookspecs import hookspec

if TYPE_CHECKING:  # annotations only
    import torch
    from ftengine.config import Config

    from .layer import LoraLinear

    LoraVariant = object  # any object with the attributes ftengine_lora_variant lists


@hookspec(firstresult=True)
def ftengine_lora_variant(config: Config) -> LoraVariant | None:
    """Return the variant that changes how LoRA adapters compute, or ``None`` for plain LoRA.

    Called once per ``LoraMethod.inject`` (and per loaded adapter whose
    ``adapter_config.json`` sets the variant's flag). The ``dora`` plugin returns its DoRA
    variant. A variant is an object with:

    * ``name`` (str) and ``peft_flag`` (str): the ``adapter_config.json`` key that is ``true``
      for adapters of this variant (``"use_dora"``);
    * ``parameter_shapes(layer) -> {peft suffix: shape}``: the extra tensors one adapter of a
      ``LoraLinear`` holds, named as in PEFT files (``{"lora_magnitude_vector": (out,)}``);
    * ``add(layer, name)``: create those parameters on ``layer`` (in a ``ModuleDict`` or
      ``ParameterDict`` attribute keyed by the adapter name) after ``lora_A``/``lora_B``
      are initialised;
    * ``forward(layer, name, x, base_output) -> output``: the layer's whole output, given
      ``x`` (cast to the adapter's dtype, dropout not yet applied) and the base layer's output;
    * ``column_scale(layer, name) -> tensor [out]`` (optional): for mixed batches
      (``AdapterMethod.set_rows``), the factor ``g`` in
      ``y = base + (g − 1)·(base − bias) + g·s·B A x`` that gives the variant's eval-mode output;
      a variant without it cannot share a batch with other adapters;
    * ``merge(layer, name, weight) -> (merged_weight, undo)`` and
      ``unmerge(layer, name, merged_weight, undo) -> weight``: fold the adapter into a dense
      base weight and take it out again; ``undo`` is whatever ``unmerge`` needs that cannot be
      recomputed from the merged weight (kept by the layer while merged).

    :param config: the run ``Config``.
    """


@hookspec(firstresult=True)
def ftengine_lora_kernel(layer: LoraLinear, name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Return a function computing a ``LoraLinear``'s whole output for adapter ``name``, or
    ``None`` to keep the eager forward.

    Called by ``lora`` in ``ftengine_on_train_start`` for every adapter layer and its active
    adapter; the result is stored in ``layer.kernel[name]`` and used while the adapter is active
    and not merged. A kernel must give the eager forward's outputs and gradients (dropout,
    scaling and variant included) or return ``None`` for layers it does not support.

    :param layer: a ``ftengine.plugins.lora.layer.LoraLinear``.
    :param name: the adapter name.
    :return: ``fn(x) -> y`` or ``None``.
    """


@hookspec(firstresult=True)
def ftengine_lora_rows_kernel(layer: LoraLinear) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """Return a function computing a ``LoraLinear``'s whole output in a mixed-adapter batch
    (``AdapterMethod.set_rows``), or ``None`` to keep the eager matmuls per adapter.

    Called by ``lora`` for every layer an adapter is loaded into (``LoraMethod.load``),
    once per load; the result is stored in ``layer.rows_kernel``. The function is called as
    ``fn(x, slots)`` with ``x`` ``[rows, ..., in]`` and ``slots`` an integer tensor ``[rows]``
    of each row's slot in ``layer.adapter_stack()`` (0: no adapter in this layer, the base
    alone); it reads the stack at every call. It must give the eager mixed path's output (each
    row: its adapter's eval-mode output, DoRA rows through the stack's ``column_scale``); it is
    used without autograd only (``lora`` keeps its eager path for a forward that records a graph
    through ``x`` or the base layer).

    :param layer: a ``ftengine.plugins.lora.layer.LoraLinear``.
    :return: ``fn(x, slots) -> y`` or ``None``.
    """
