"""QLoRA: LoRA (or DoRA) adapters trained on a base whose linear layers are 4-bit NF4.

    ftengine run job.yaml --plugin lora --plugin qlora [--plugin dora] -o qlora.compute_dtype=bfloat16

``ftengine_quantize_model`` replaces every ``torch.nn.Linear`` of the base model except the
output head by a bitsandbytes ``Linear4bit`` (NF4, blocksize 64, double quantisation by
default) before adapters are injected, so the LoRA layers wrap the 4-bit layers and only the
adapters train. Embeddings, norms and ``lm_head`` keep their dtype.

The quantised weights never leave the process: the adapter is saved by ``lora`` in PEFT
format and loads on a full-precision or a 4-bit base. ``ftengine merge --plugin qlora``
dequantises the base first (``ftengine_dequantize_model``), so the merged model is a plain
transformers model holding the dequantised base plus the adapter; see ``docs/qlora.md`` for
why merging back into 4 bits is not offered.
"""

from typing import Literal

import torch
from ftengine import hookimpl
from ftengine.config import Section
from ftengine.errors import ConfigError
from ftengine.log import note
from ftengine.modeling import output_head, replace_module
from pydantic import Field, field_validator

requires = (("lora", "prompt_tuning"),)  # an adapter to train over the frozen 4-bit base
conflicts = ("full",)
changes_base = True  # ftengine merge quantises the base again, as the adapter was trained over it

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class QloraOptions(Section):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; nf4 suits normally distributed weights")
    blocksize: int = Field(64, description=f"weights per quantisation block: one of {', '.join(map(str, BLOCKSIZES))}")
    double_quant: bool = Field(True, description="quantise the per-block scales too (~0.37 bit/weight saved)")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype the 4-bit weights are dequantised to for matmuls; auto = float32 on CPU, bfloat16 on CUDA"
    )

    @field_validator("blocksize")
    @classmethod
    def _supported_blocksize(cls, value):
        if value not in BLOCKSIZES:
            raise ValueError(f"bitsandbytes supports blocksizes {', '.join(map(str, BLOCKSIZES))}")
        return value


def compute_dtype(options, device):
    """The dtype 4-bit layers compute in: the configured one, or by device for ``auto``."""
    if options.compute_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[options.compute_dtype]


@hookimpl
def ftengine_config_section(register):
    register("qlora", QloraOptions)


@hookimpl
def ftengine_validate(config):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return ["plugin 'qlora' needs bitsandbytes, which is not installed: pip install bitsandbytes"]
    return []


# --------------------------------------------------------------------------------------------
# quantise
# --------------------------------------------------------------------------------------------


def quantize_linear(linear, options, dtype):
    """A ``Linear4bit`` holding ``linear``'s weight quantised, and the same bias."""
    from bitsandbytes.nn import Linear4bit, Params4bit

    layer = Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=dtype,
        compress_statistics=options.double_quant,
        quant_type=options.quant_type,
        device="meta",
    )
    # Moving an unquantised Params4bit to a device is what quantises it.
    layer.weight = Params4bit(
        linear.weight.data,
        requires_grad=False,
        blocksize=options.blocksize,
        compress_statistics=options.double_quant,
        quant_type=options.quant_type,
        module=layer,
    ).to(linear.weight.device)
    layer.bias = linear.bias
    # bitsandbytes' AVX512-BF16 CPU inference path repacks the weight and computes in bfloat16
    # whatever compute_dtype says: eval would then disagree with training and merging.
    layer.support_avx512bf16_for_cpu = False
    return layer


@hookimpl
def ftengine_quantize_model(model, config):
    device = next(model.parameters()).device
    dtype = compute_dtype(config.qlora, device)
    head = output_head(model)
    # Exactly nn.Linear: subclasses (nn.MultiheadAttention's out_proj) may read .weight directly.
    targets = [(n, m) for n, m in model.named_modules() if type(m) is torch.nn.Linear and m is not head]
    if not targets:
        raise ConfigError(
            [
                f"qlora: {type(model).__name__} has no torch.nn.Linear layer besides the output head to quantise; "
                f"use --plugin lora without qlora"
            ]
        )
    if device.type == "cpu":
        _refuse_widths_misread_on_cpu(targets, config.qlora.blocksize)
    for name, linear in targets:
        replace_module(model, name, quantize_linear(linear, config.qlora, dtype))
    if device.type == "cpu":
        _release_checkpoint_mapping(model)
    return True


def _misread_on_cpu(in_features, blocksize):
    """Whether bitsandbytes' CPU dequantisation reads this width with the wrong block scales.

    Seen in bitsandbytes 0.50.2: a row-major weight whose input width is a multiple of 16 but
    not of the blocksize dequantises with the scales of the wrong blocks (at width 32 and
    blocksize 64, every row gets block 0's), so the base model is silently wrong. Its quantiser
    and its other dequantisation paths use the flat layout and are right.
    """
    return in_features % 16 == 0 and in_features % blocksize != 0


def _refuse_widths_misread_on_cpu(targets, blocksize):
    misread = [(name, linear.in_features) for name, linear in targets if _misread_on_cpu(linear.in_features, blocksize)]
    if not misread:
        return
    import bitsandbytes

    named = ", ".join(f"{name} (in_features {width})" for name, width in misread[:3])
    if len(misread) > 3:
        named += f" and {len(misread) - 3} more"
    safe = [size for size in BLOCKSIZES if not any(_misread_on_cpu(linear.in_features, size) for _, linear in targets)]
    fix = f"use -o qlora.blocksize={max(safe)} (it divides every such width)" if safe else "train on CUDA"
    raise ConfigError(
        [
            f"qlora.blocksize: {blocksize} does not divide the input width of {named}; bitsandbytes "
            f"{bitsandbytes.__version__} dequantises such layers on CPU with the wrong block scales. {fix}; "
            f"see docs/qlora.md"
        ]
    )


def _release_checkpoint_mapping(model):
    """Give the tensors left in full precision memory of their own.

    On CPU transformers memory-maps the checkpoint, and the mapping, with every page read while
    quantising, stays resident as long as any tensor (the embeddings, a norm) points into it:
    the replaced float32 weights would go on taking their memory.
    """
    from bitsandbytes.nn import Params4bit

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if not isinstance(tensor, Params4bit):
                tensor.data = tensor.data.clone()


def quantized_bytes(model):
    """``(weights, bytes)`` of the 4-bit layers: packed weights plus per-block scales.

    The 16-entry NF4 and 256-entry scale codebooks are constant lookup tables, not counted:
    with them out, NF4 + double quantisation at blocksize 64 is 4 + 8/64 + 32/(64*256) =
    4.127 bits per weight, the QLoRA paper's figure.
    """
    from bitsandbytes.nn import Linear4bit

    weights, total = 0, 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            state = module.weight.quant_state
            weights += state.shape.numel()
            total += module.weight.numel() * module.weight.element_size() + _bytes(state.absmax)
            if state.nested:
                total += _bytes(state.state2.absmax) + _bytes(state.offset)
    return weights, total


def _bytes(tensor):
    return tensor.numel() * tensor.element_size()


@hookimpl
def ftengine_on_train_start(model, state):
    build = state.build_info
    if "weight_bytes_quantized" not in build:
        return
    weights, packed = quantized_bytes(model)
    note(
        f"qlora: model weights {build['weight_bytes'] / 2**20:.1f} MiB -> {build['weight_bytes_quantized'] / 2**20:.1f} MiB "
        f"({state.config.qlora.quant_type}, {8 * packed / max(weights, 1):.3f} bits per quantised weight with its scales)"
    )


# --------------------------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------------------------


def dequantize_linear(layer):
    """A plain ``nn.Linear`` holding exactly the weight ``layer``'s forward multiplies by.

    The weight is dequantised, rounded to the compute dtype as the 4-bit forward does, and
    kept in the dtype it was quantised from, so the model has one dtype again and the adapter
    merges into it at full precision.
    """
    import bitsandbytes.functional as bf

    state = layer.weight.quant_state
    weight = bf.dequantize_4bit(layer.weight.data, state).to(layer.compute_dtype or state.dtype).to(state.dtype)
    linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        linear.bias = torch.nn.Parameter(layer.bias.data.to(state.dtype), requires_grad=layer.bias.requires_grad)
    return linear


def dequantize_model(model):
    """Replace every ``Linear4bit`` in ``model`` (LoRA base layers included) by ``nn.Linear``."""
    from bitsandbytes.nn import Linear4bit

    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]:
        replace_module(model, name, dequantize_linear(module))


@hookimpl
def ftengine_dequantize_model(model):
    # LoRA merges into base_layer.weight, which must be a real float tensor; re-quantising the
    # merged weight would add a second rounding error on top of NF4's (PEFT#2105).
    dequantize_model(model)
