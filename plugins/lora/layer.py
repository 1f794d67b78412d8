"""LoRA adapter layers: ``LoraLinear`` wraps a frozen linear layer and adds named adapters.

::

                     x  [..., in]
             ┌────────┴─────────┐
             │                  ▼
             │         dropout[name](x)
             ▼                  │
      base_layer(x)       lora_A[name]   [in → r]   Kaiming-uniform (or Gaussian) init
      (frozen W, b;             │
       nn.Linear or       lora_B[name]   [r → out]  zero init: the output starts equal to the base
       bnb Linear4bit)          │
             │           × scaling[name] = alpha / r   (alpha / √r with rsLoRA)
             └──────── + ───────┘
                       │
                       ▼  y = W x + b + scaling · B A dropout(x)

A layer holds any number of adapters by name; one (``active_adapter``) or none is used. A
*variant* (DoRA, from the ``ftengine_lora_variant`` hook) replaces the right-hand branch, and a
*kernel* (from ``ftengine_lora_kernel``) may replace the whole forward. ``merge`` folds the
active adapter into the base weight (``merged`` makes it idempotent); ``unmerge`` takes it out
again by recomputing the same delta, so nothing but the ``merged`` flag is kept.

Mixed batches (serving many adapters at once): ``set_adapter_rows(names)`` makes row ``i`` of
the following forwards use adapter ``names[i]`` (``None`` or a name the layer lacks: the base
alone), until ``set_adapter_rows(None)``. Every adapter the layer holds is kept in a stack
(padded with zeros to the largest rank; slot 0 is the base); setting the rows only groups the
rows by slot (a slice where they are consecutive, else an index tensor), and a forward runs the
base once for the whole batch, then each adapter of the batch once over its own rows (taken,
then added back: S-LoRA's and Punica's grouping, a loop over the few distinct adapters)::

    y = W x + b;   y[rows_a] += s_a · (x[rows_a] · A_a) · B_a      for each adapter a in the batch
    DoRA rows:  y[i] = base[i] + (g_i − 1) ⊙ (base[i] − b) + g_i ⊙ s_i · (x[i] · A_i) · B_i

where ``g_i`` is the variant's per-column scale (DoRA: ``m / ‖W + ΔW‖``), constant at
inference and computed when the stack is built, not per forward; plain rows have ``g = 1``.
A row joining or leaving costs its index, not a copy of every row's matrices (which the
earlier gathered path paid at every change of the rows, more than a decode step), and a row
only ever meets its own adapter's weights: a broken adapter fails its own rows alone. A *rows
kernel* (from ``ftengine_lora_rows_kernel``, asked when an adapter is loaded: ``fused_lora``
on CUDA) may instead compute the whole mixed output reading the stack by slot. The path is for
inference: no dropout, no gradients for the adapters, and a merged layer refuses it.

The base layer is never copied: a wrapper only holds a reference to it. Adapter parameters are
created in float32 on the base weight's device, whatever the base dtype (4-bit included).
"""

import math
import re
from typing import NamedTuple

import torch
from ftengine.errors import AdapterError
from ftengine.modeling import output_head, replace_module
from torch import nn


def lora_scaling(alpha, r, rslora):
    """The factor on ``B A x``: ``alpha / r``, or ``alpha / sqrt(r)`` for rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def dense_weight(base_layer):
    """The base layer's weight as a dense tensor; bitsandbytes 4-bit weights are dequantised."""
    weight = base_layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight
    if getattr(quant_state, "packing_format_for_cpu", False):
        # bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU inference path, and
        # dequantize_4bit would read that layout as garbage.
        raise AdapterError(
            "a 4-bit base weight is in bitsandbytes' CPU inference packing and cannot be dequantised; "
            "set support_avx512bf16_for_cpu = False on Linear4bit layers (the qlora plugin does)"
        )
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_4bit(weight.data, quant_state)


class AdapterStack(NamedTuple):
    """Every adapter of a layer, stacked for mixed batches; slot 0 is the base (zeros)."""

    slots: dict  # adapter name -> slot (1, 2, ...)
    lora_a: torch.Tensor  # [slots, in, r_max], fp32, ranks padded with zeros
    lora_b: torch.Tensor  # [slots, r_max, out]
    scaling: torch.Tensor  # [slots]
    column_scale: torch.Tensor | None  # [slots, out]: the variant's g (ones for plain LoRA), or None
    scaled: set  # the slots with a variant's column scale
    by_slot: list  # (A [in, r_max], B [r_max, out], scaling as a float) of each slot: views, for the grouped forward


class LoraLinear(nn.Module):
    """A frozen linear layer plus named LoRA adapters (see the module docstring).

    Parameter names are ``lora_A.<adapter>.weight``, ``lora_B.<adapter>.weight`` and, for DoRA,
    ``lora_magnitude_vector.<adapter>``: PEFT's on-disk names with the adapter name removed.
    """

    def __init__(self, base_layer):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.scaling = {}
        self.variant = {}
        self.kernel = {}
        self.rows_kernel = None  # fn(x, slots) -> y for mixed batches (ftengine_lora_rows_kernel)
        self.active_adapter = None
        self.merged = False
        # What the merged variant needs to unmerge and cannot recompute (DoRA's row norms).
        self._unmerge_info = None
        # Mixed batches: every adapter stacked (built on demand), and the rows' slots and groups.
        self._stack = None
        self._rows = None
        self.train(base_layer.training)

    def add_adapter(self, name, *, r, alpha, dropout, rslora=False, init="kaiming", variant=None):
        """Create adapter ``name`` (inactive): A initialised by ``init``, B zero."""
        if name in self.lora_A:
            raise AdapterError(f"an adapter named '{name}' is already loaded; load this one under another name")
        device = self.base_layer.weight.device
        lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(lora_A.weight, std=1 / r)
            else:  # the default nn.Linear init, as in the LoRA paper's reference code
                nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(lora_B.weight)
        self.lora_A[name] = lora_A
        self.lora_B[name] = lora_B
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = lora_scaling(alpha, r, rslora)
        self.variant[name] = variant
        self.kernel[name] = None
        if variant is not None:
            variant.add(self, name)
        for module in (lora_A, lora_B, self.lora_dropout[name]):
            module.train(self.training)
        self._stack = None

    def delete_adapter(self, name):
        """Remove adapter ``name`` and its parameters (a no-op for a name the layer lacks)."""
        if name not in self.lora_A:
            return
        if self.merged and self.active_adapter == name:
            self.unmerge()
        for container in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector):
            if name in container:
                del container[name]
        for table in (self.scaling, self.variant, self.kernel):
            table.pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = None
        self._stack = None

    def set_active_adapter(self, name):
        """Use adapter ``name`` (``None``, or a name this layer lacks: the base layer alone)."""
        name = name if name in self.lora_A else None
        if self.merged and name != self.active_adapter:
            self.unmerge()
        # A plain attribute: skip nn.Module.__setattr__'s checks, a swap visits every layer.
        self.__dict__["active_adapter"] = name

    def delta_weight(self, name):
        """``scaling · B A``: the adapter's update of the base weight, ``[out, in]``."""
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]

    def forward(self, x):
        if self._rows is not None:
            return self._forward_rows(x)
        name = self.active_adapter
        if name is None or self.merged:
            return self.base_layer(x)
        if self.kernel.get(name) is not None:
            return self.kernel[name](x)
        lora_A = self.lora_A[name]
        variant = self.variant[name]
        autocast = variant is None and torch.is_autocast_enabled(x.device.type)
        if autocast and type(self.base_layer).forward is nn.Linear.forward:
            # Both matmuls would cast x to the autocast dtype (an fp32 residual stream after a
            # norm): cast it once, and the dropout mask multiplies half the bytes (exactly: 0 or 1).
            x = x.to(torch.get_autocast_dtype(x.device.type))
        base_output = self.base_layer(x)
        if variant is not None:
            return variant.forward(self, name, x.to(lora_A.weight.dtype), base_output).to(base_output.dtype)
        if not autocast:
            # Under autocast the adapter's matmuls run in the autocast dtype whatever x is, and a
            # round trip through fp32 would only copy the activations twice.
            x = x.to(lora_A.weight.dtype)
        x, scaling = self._dropout(name, x)
        return torch.add(base_output, self.lora_B[name](lora_A(x)), alpha=scaling).to(base_output.dtype)

    def _dropout(self, name, x):
        """``(x', s)`` with ``s · B A x'`` the adapter's output on x under its dropout.

        ``nn.Dropout`` multiplies x by a 0/1 mask scaled by ``1 / (1 - p)``; the mask is drawn
        the same way here (the same random numbers), but the scale moves onto the scalar
        ``scaling`` (B A is linear), which saves a pass over the activations and, under bf16
        autocast, keeps ``1 / (1 - p)`` exact instead of rounding it to bf16 in every element.
        """
        dropout = self.lora_dropout[name]
        if not (isinstance(dropout, nn.Dropout) and dropout.training and 0 < dropout.p < 1):
            return dropout(x), self.scaling[name]
        keep = 1 - dropout.p
        return x * torch.empty_like(x).bernoulli_(keep), self.scaling[name] / keep

    # ----------------------------------------------------------------------------------------
    # mixed batches: one adapter per row
    # ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def adapter_stack(self):
        """The ``AdapterStack``: A ``[n+1, in, r_max]``, B ``[n+1, r_max, out]``, scaling
        ``[n+1]``, g ``[n+1, out]`` or None; slot 0 is the base (zeros). Cached; rebuilt after
        adapters are added or deleted. The scaling stays a separate factor, applied after B as
        the single-adapter forward does, so a row's output matches it to rounding."""
        if self._stack is not None:
            return self._stack
        names = list(self.lora_A)
        device = self.base_layer.weight.device
        rank = max((self.lora_A[n].out_features for n in names), default=1)
        stack_a = torch.zeros(len(names) + 1, self.in_features, rank, device=device)
        stack_b = torch.zeros(len(names) + 1, rank, self.out_features, device=device)
        scaling = torch.zeros(len(names) + 1, device=device)
        scales, scaled = None, set()
        for slot, name in enumerate(names, start=1):
            r = self.lora_A[name].out_features
            stack_a[slot, :, :r] = self.lora_A[name].weight.t()
            stack_b[slot, :r] = self.lora_B[name].weight.t()
            scaling[slot] = self.scaling[name]
            variant = self.variant[name]
            if variant is None:
                continue
            column_scale = getattr(variant, "column_scale", None)
            if column_scale is None:
                raise AdapterError(
                    f"adapter '{name}' uses the {variant.name} variant, which cannot be mixed with others in one batch "
                    f"(it has no column_scale); serve it alone"
                )
            if scales is None:
                scales = torch.ones(len(names) + 1, self.out_features, device=device)
            scales[slot] = column_scale(self, name)
            scaled.add(slot)
        slots = {name: slot for slot, name in enumerate(names, start=1)}
        by_slot = [(a, b, float(s)) for a, b, s in zip(stack_a, stack_b, scaling)]
        self._stack = AdapterStack(slots, stack_a, stack_b, scaling, scales, scaled, by_slot)
        return self._stack

    def set_adapter_rows(self, names, shared=None):
        """Use adapter ``names[i]`` for row ``i`` of the next forwards (``None`` or a name this
        layer lacks: the base layer alone for that row); ``names=None``: back to the active
        adapter. Adapter weights changed after this call are not seen until it is called again
        after an adapter is added or deleted (the stack is cached). Costs index tensors of the
        rows, never a copy of adapter matrices; with a rows kernel only the rows' slots are
        kept: the kernel reads the stack itself. ``shared``: a dict kept across the layers of
        one call, so layers whose rows fall in the same slots build their indices once."""
        if names is None:
            self._rows = None
            return
        if self.merged:
            raise AdapterError("a merged LoRA layer cannot use one adapter per row: unmerge the adapters first")
        stack = self.adapter_stack()
        row_slots = tuple(stack.slots.get(name, 0) for name in names)
        shared = {} if shared is None else shared
        if row_slots not in shared:
            shared[row_slots] = _slot_indices(row_slots, stack.lora_a.device)
        index, rows_of = shared[row_slots]
        self._rows = (index, None if self.rows_kernel is not None else self._row_groups(stack, index, rows_of))

    @staticmethod
    def _row_groups(stack, index, rows_of):
        """``([(A [in, r_max], B [r_max, out], scaling, its rows: a slice or indices), ...], g
        [rows, out] or None)``: each adapter of the batch with its rows (views of the stack;
        the base's rows need nothing), and each row's column scale where a row's adapter has
        one."""
        groups = [(*stack.by_slot[slot], rows) for slot, rows in rows_of.items()]
        row_scales = stack.column_scale[index] if stack.scaled.intersection(rows_of) else None
        return groups, row_scales

    def _forward_rows(self, x):
        index, grouped = self._rows
        if x.shape[0] != index.shape[0]:
            raise AdapterError(f"a batch of {x.shape[0]} rows, but adapters were set for {index.shape[0]} rows")
        stack = self.adapter_stack()
        if grouped is None:
            if not self._needs_autograd(x):
                return self.rows_kernel(x, index)
            grouped = self._row_groups(stack, index, _slot_indices(index.tolist(), index.device)[1])  # the kernel has no backward
        groups, row_scales = grouped
        base_output = self.base_layer(x)
        flat = x.to(stack.lora_a.dtype).reshape(x.shape[0], -1, self.in_features)
        update = flat.new_zeros(flat.shape[0], flat.shape[1], self.out_features)
        for lora_a, lora_b, scaling, rows in groups:
            if isinstance(rows, slice):
                update[rows].add_((flat[rows] @ lora_a) @ lora_b, alpha=scaling)
            else:
                update.index_add_(0, rows, (flat.index_select(0, rows) @ lora_a) @ lora_b, alpha=scaling)
        update = update.view(*x.shape[:-1], self.out_features)
        if row_scales is None:
            return (base_output + update).to(base_output.dtype)
        scale = row_scales.view(x.shape[0], *([1] * (x.dim() - 2)), self.out_features)
        bias = self.base_layer.bias
        direction_output = base_output if bias is None else base_output - bias
        return (base_output + (scale - 1) * direction_output + scale * update).to(base_output.dtype)

    def _needs_autograd(self, x):
        """Whether this forward records a graph through x or the base layer (the adapters in the
        stack are constants either way)."""
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.base_layer.parameters()))

    @torch.no_grad()
    def merge(self):
        """Fold the active adapter into ``base_layer.weight``; a no-op if merged or inactive.

        The weight is read from ``base_layer`` now, so a plugin may first replace a quantised
        base layer by a dense one (``qlora`` merges with ``tryfirst=True``).
        """
        name = self.active_adapter
        if self.merged or name is None:
            return
        weight = self.base_layer.weight
        variant = self.variant[name]
        if variant is None:
            weight.add_(self.delta_weight(name).to(weight.dtype))
        else:
            merged, self._unmerge_info = variant.merge(self, name, weight)
            weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Take the merged adapter out of the base weight again; a no-op if not merged."""
        if not self.merged:
            return
        name = self.active_adapter
        weight = self.base_layer.weight
        variant = self.variant[name]
        if variant is None:
            weight.sub_(self.delta_weight(name).to(weight.dtype))
        else:
            weight.copy_(variant.unmerge(self, name, weight, self._unmerge_info))
        self.merged, self._unmerge_info = False, None

    def extra_repr(self):
        adapters = ", ".join(f"{n}: r={self.lora_A[n].out_features}" for n in self.lora_A)
        return f"adapters=[{adapters}], active={self.active_adapter!r}, merged={self.merged}"


def _slot_indices(row_slots, device):
    """``(slots [rows], {slot: its rows})`` for the rows' stack slots ``row_slots``, slot 0 (the
    base) left out; a slot's rows are a ``slice`` when they are consecutive (a view of the
    batch, no copy: one adapter for every row, a request's rows), else an index tensor."""
    rows_of = {}
    for row, slot in enumerate(row_slots):
        if slot:
            rows_of.setdefault(slot, []).append(row)
    return (
        torch.tensor(row_slots, device=device),
        {
            slot: slice(rows[0], rows[-1] + 1) if rows[-1] - rows[0] == len(rows) - 1 else torch.tensor(rows, device=device)
            for slot, rows in rows_of.items()
        },
    )


# --------------------------------------------------------------------------------------------
# finding, wrapping and unwrapping layers in a model
# --------------------------------------------------------------------------------------------


def lora_layers(model):
    """``[(path, LoraLinear), ...]`` in module order.

    Walks the model without entering the wrappers (whose adapter dicts hold most of the modules
    once several adapters are loaded), so swapping adapters stays well under a millisecond.
    """
    if isinstance(model, LoraLinear):
        return [("", model)]
    found = []

    def walk(module, prefix):
        for name, child in module._modules.items():
            if child is None:
                continue
            if isinstance(child, LoraLinear):
                found.append((prefix + name, child))
            else:
                walk(child, f"{prefix}{name}.")

    walk(model, "")
    return found


def linear_modules(model):
    """Adaptable layers by path: ``nn.Linear`` (bitsandbytes ``Linear4bit`` included) and
    ``LoraLinear`` wrappers, but not the layers inside a wrapper."""
    found, wrapper_prefixes = {}, ()
    for path, module in model.named_modules():
        if path.startswith(wrapper_prefixes):
            continue
        if isinstance(module, LoraLinear):
            wrapper_prefixes += (f"{path}.",)
            found[path] = module
        elif isinstance(module, nn.Linear):
            found[path] = module
    return found


def select_targets(model, target_modules):
    """Paths of the linear layers ``target_modules`` selects, as PEFT selects them.

    ``"all-linear"``: every linear layer but the output head; another string: a regular
    expression the whole path must match; a list: names equal to a path or to its last parts.
    """
    modules = linear_modules(model)
    if target_modules == "all-linear":
        head = output_head(model)
        return [p for p, m in modules.items() if head is None or (m is not head and getattr(m, "base_layer", None) is not head)]
    if isinstance(target_modules, str):
        return [p for p in modules if re.fullmatch(target_modules, p)]
    return [p for p in modules if any(p == t or p.endswith(f".{t}") for t in target_modules)]


def wrap_linear(model, path):
    """The ``LoraLinear`` at ``path``, wrapping the linear layer there first if needed."""
    module = model.get_submodule(path)
    if isinstance(module, LoraLinear):
        return module
    wrapper = LoraLinear(module)
    replace_module(model, path, wrapper)
    return wrapper


def inject_adapter(model, paths, name, *, r, alpha, dropout, rslora=False, init="kaiming", variant=None):
    """Add adapter ``name`` to the linear layers at ``paths`` (wrapping them); return the layers."""
    layers = [wrap_linear(model, path) for path in paths]
    for layer in layers:
        layer.add_adapter(name, r=r, alpha=alpha, dropout=dropout, rslora=rslora, init=init, variant=variant)
    return layers


def unwrap_merged(model):
    """Replace every ``LoraLinear`` by its base layer; active adapters must be merged first."""
    layers = lora_layers(model)
    unmerged = [path for path, layer in layers if layer.active_adapter is not None and not layer.merged]
    if unmerged:
        raise AdapterError(f"cannot unwrap '{unmerged[0]}': its active adapter is not merged (merge first)")
    for path, layer in layers:
        replace_module(model, path, layer.base_layer)
