"""fused_lora: LoRA and DoRA layers computed by fused Triton kernels on CUDA.

    ftengine run job.yaml --plugin lora --plugin fused_lora

The ``lora`` plugin calls ``ftengine_lora_kernel(layer, name)`` once per LoRA layer and adapter;
this plugin answers with a forward function built on ``kernel.fused_lora_linear`` (base GEMM,
LoRA and dropout, or DoRA without dropout, in fused kernels; a QLoRA base in bitsandbytes NF4 is
dequantised inside the GEMMs), or ``None`` where the fused path does not apply, and the layer
then runs eagerly. Each layer keeps the answers it got (``layer.fused_lora_decisions``), and
``summary(model)`` says in one line what was fused in a model and why the rest was not.

Mixed-adapter batches (serving, ``AdapterMethod.set_rows``): ``lora`` calls
``ftengine_lora_rows_kernel(layer)`` when it loads an adapter into a layer; this plugin answers
with a forward built on ``kernel.mixed_lora_`` (every row's own LoRA/DoRA update added to the
base output in one launch, reading the layer's adapter stack by slot), kept in
``layer.fused_lora_rows_decision`` and summed up by ``rows_summary(model)``. With
``TRITON_INTERPRET=1`` the kernels run on CPU through Triton's interpreter (slowly), which is
how the tests train with the plugin active on machines without a GPU.

Nothing here imports Triton until a layer is actually fused: plugin discovery imports this
module on every machine, and the kernel module fixes its interpreter mode when imported.
"""

import importlib.util
import sys
from collections import Counter

import torch
from ftengine import hookimpl
from ftengine.log import note
from torch import nn

requires = ("lora",)

# The attribute of a LoRA layer holding {adapter name: None if fused, else why not}.
DECISIONS = "fused_lora_decisions"
# The attribute holding None if the layer's mixed-adapter batches run the kernel, else why not.
ROWS_DECISION = "fused_lora_rows_decision"


@hookimpl
def ftengine_lora_kernel(layer, name):
    """The fused forward of adapter ``name`` of ``layer``, or ``None`` where unsupported; the
    decision is kept on the layer for ``summary``."""
    reason = _environment_problem() or unsupported_reason(layer, name)
    decisions = getattr(layer, DECISIONS, None)
    if decisions is None:
        decisions = {}
        setattr(layer, DECISIONS, decisions)
    decisions[name] = reason
    return None if reason else fused_forward(layer, name)


@hookimpl
def ftengine_lora_rows_kernel(layer):
    """The mixed-adapter forward of ``layer`` through ``kernel.mixed_lora_``, or ``None`` where
    it does not apply; the decision is kept on the layer for ``rows_summary``."""
    reason = _environment_problem() or rows_unsupported_reason(layer)
    setattr(layer, ROWS_DECISION, reason)
    return None if reason else rows_forward(layer)


@hookimpl(trylast=True)
def ftengine_on_train_start(model, state):
    """Report, after ``lora`` asked for a kernel per layer, which layers run fused and why the
    others fall back to the eager path (on CPU: that the plugin is inactive)."""
    note(summary(model))


def summary(model):
    """One line on the layers of ``model`` (any module), e.g.
    "fused_lora: 82 layers fused, 2 fell back (r > 128: 2)"."""
    problem = _environment_problem()
    if problem:
        return f"fused_lora: inactive ({problem})"
    decided = (getattr(module, DECISIONS, None) or {} for module in model.modules())
    reasons = Counter(reason for adapters in decided for reason in adapters.values())
    fused = reasons.pop(None, 0)
    mode = " (Triton interpreter: slow)" if _interpreted() else ""
    line = f"fused_lora{mode}: {fused} layers fused, {sum(reasons.values())} fell back"
    if reasons:
        line += " (" + ", ".join(f"{reason}: {count}" for reason, count in reasons.most_common()) + ")"
    return line


def rows_summary(model):
    """One line on the mixed-adapter batches of ``model``'s LoRA layers, e.g.
    "fused_lora: mixed-adapter batches in 210 layers through the kernel, 0 eager"."""
    problem = _environment_problem()
    if problem:
        return f"fused_lora: mixed-adapter batches eager ({problem})"
    reasons = Counter(getattr(m, ROWS_DECISION) for m in model.modules() if hasattr(m, ROWS_DECISION))
    fused = reasons.pop(None, 0)
    mode = " (Triton interpreter: slow)" if _interpreted() else ""
    line = f"fused_lora{mode}: mixed-adapter batches in {fused} layers through the kernel, {sum(reasons.values())} eager"
    if reasons:
        line += " (" + ", ".join(f"{reason}: {count}" for reason, count in reasons.most_common()) + ")"
    return line


def _environment_problem():
    if importlib.util.find_spec("triton") is None:
        return "triton missing"
    if not torch.cuda.is_available() and not _interpreted():
        return "no CUDA device"
    return None


def _interpreted():
    """Whether the kernels run through Triton's interpreter (``TRITON_INTERPRET=1``): on CPU
    tensors, slowly; for tests and for trying the plugin without a GPU."""
    from .kernel import INTERPRETED

    return INTERPRETED


def unsupported_reason(layer, name):
    """Why the fused kernels cannot compute adapter ``name`` of ``layer``, or ``None``.

    Needs Triton importable (the limits live in the kernel module).
    """
    from .kernel import MAX_RANK, SUPPORTED_DTYPES

    base = layer.base_layer
    variant = layer.variant[name]
    if layer.merged:
        return "adapter merged into the base weight"
    variant_name = None if variant is None else getattr(variant, "name", type(variant).__name__)
    if variant_name not in (None, "dora"):
        return f"LoRA variant '{variant_name}' not supported"
    if variant_name == "dora" and _dropout_p(layer, name) > 0:
        return "DoRA with dropout > 0 not supported (W·dropout(x) needs a second base GEMM)"
    quantized = _is_4bit(base)
    if not quantized and type(base) is not nn.Linear:
        return f"base layer {type(base).__name__} not supported"
    if quantized and (reason := _4bit_unsupported_reason(base, variant_name)):
        return reason
    if layer.lora_A[name].weight.shape[0] > MAX_RANK:
        return f"r > {MAX_RANK}"
    dtype = base.compute_dtype if quantized else base.weight.dtype
    if dtype is not None and dtype not in SUPPORTED_DTYPES:  # None: a 4-bit base computes in x's
        return f"dtype {dtype} not supported"
    if base.weight.device.type != "cuda" and not _interpreted():
        return "not on a CUDA device"
    return None


def rows_unsupported_reason(layer):
    """Why ``kernel.mixed_lora_`` cannot serve the mixed-adapter batches of ``layer``, or
    ``None``. The base output comes from the base layer itself, so any base (4-bit included)
    and any rank (the kernel loops over rank slices) qualify; only the device matters."""
    if layer.base_layer.weight.device.type != "cuda" and not _interpreted():
        return "not on a CUDA device"
    return None


def rows_forward(layer):
    """``fn(x, slots) -> y``: ``layer``'s output in a mixed-adapter batch, each row ``i`` with
    the adapter in slot ``slots[i]`` of ``layer.adapter_stack()`` (0: the base alone): the base
    layer's output, then ``kernel.mixed_lora_`` adds every row's update to it in place.

    The stack is read at every call (the layer caches it until adapters change); the rows'
    adapter indices (slot − 1) are kept for as long as the layer keeps the same ``slots``
    tensor, i.e. until the next ``set_adapter_rows``, so a decode step launches the base GEMM
    and one kernel per layer. Forward only: ``lora`` keeps its eager path when autograd records.
    """
    from .kernel import mixed_lora_

    indices = [None, None]  # (the slots tensor last seen, its adapter indices)

    def forward(x, slots):
        if indices[0] is not slots:
            indices[:] = [slots, slots - 1]
        stack = layer.adapter_stack()
        base = layer.base_layer
        y = base(x).contiguous()
        column_scale = None if stack.column_scale is None else stack.column_scale[1:]
        return mixed_lora_(
            y,
            x,
            indices[1],
            stack.lora_a[1:].transpose(1, 2),
            stack.lora_b[1:].transpose(1, 2),
            stack.scaling[1:],
            column_scale,
            base.bias if column_scale is not None else None,
        )

    return forward


def _is_4bit(base):
    """Whether ``base`` is a bitsandbytes ``Linear4bit``. One exists only once bitsandbytes is
    imported, so it is not imported here (that takes seconds)."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    return bnb_nn is not None and isinstance(base, bnb_nn.Linear4bit)


def _4bit_unsupported_reason(base, variant_name):
    state = getattr(base.weight, "quant_state", None)
    if state is None:
        return "4-bit base weight not quantised"
    if state.quant_type != "nf4":
        return f"4-bit base quant_type {state.quant_type} not supported (NF4 only)"
    if getattr(state, "packing_format_for_cpu", False):
        return "4-bit base in bitsandbytes' CPU inference packing"
    if variant_name == "dora":
        return "DoRA on a 4-bit base not supported (its row norms need the dense W)"
    return None


def _dropout_p(layer, name):
    return getattr(layer.lora_dropout[name], "p", 0.0)


def fused_forward(layer, name):
    """``fn(x) -> y``: the whole output of ``layer`` (base + adapter ``name``) through the kernels.

    Reads the weights, DoRA's magnitude, scaling and dropout probability at every call (so
    loaded or rescaled adapters are seen) and applies dropout only while ``layer.training``;
    each call with dropout draws a fresh seed from torch's CPU generator. It computes in the
    activation dtype (the autocast dtype under autocast): adapter weights kept in fp32 are cast
    to it, differentiably; DoRA's magnitude is passed as it is, since the kernels form m / ‖·‖
    in fp32. A 4-bit base is read in place (``kernel.nf4_weight``) and the layer computes in its
    ``compute_dtype`` and returns x's dtype, as ``Linear4bit.forward`` does. The caller handles
    merged and disabled adapters, as it does for its eager path.
    """
    from .kernel import fused_lora_linear, nf4_weight

    def forward(x):
        base = layer.base_layer
        quantized = _is_4bit(base)
        dtype = _compute_dtype(base, x)
        bias = None if base.bias is None else base.bias.to(dtype)
        magnitude = None if layer.variant[name] is None else layer.lora_magnitude_vector[name]
        y = fused_lora_linear(
            x.to(dtype),
            nf4_weight(base.weight) if quantized else base.weight.to(dtype),
            bias,
            layer.lora_A[name].weight.to(dtype),
            layer.lora_B[name].weight.to(dtype),
            layer.scaling[name],
            _dropout_p(layer, name),
            training=layer.training,
            magnitude=magnitude,
        )
        return y.to(x.dtype) if quantized else y

    return forward


def _compute_dtype(base, x):
    """A ``Linear4bit``'s compute_dtype (x's if unset), which its forward casts x to; for a
    dense base the activation dtype (the autocast dtype under autocast)."""
    if _is_4bit(base):
        return base.compute_dtype or x.dtype
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
