"""The fused LoRA kernels against an eager PyTorch reference, run by Triton's interpreter on CPU.

Shapes stay small (the interpreter executes every program in Python); the block size under the
interpreter is 16-32, so these shapes still cover ragged edges and several blocks per dimension.
"""

import json

import bitsandbytes.functional as bnb_functional
import pytest
import torch
from ftengine.plugins import qlora
from torch import nn

pytest.importorskip("triton", reason="the fused_lora kernels are written in Triton, which is not installed")

from ftengine.plugins import fused_lora  # noqa: E402
from ftengine.plugins.fused_lora import kernel  # noqa: E402
from ftengine.plugins.fused_lora.kernel import (  # noqa: E402
    dequantize_nf4,
    dora_row_norm,
    dropout_mask,
    fused_lora_linear,
    nf4_weight,
)

assert kernel.INTERPRETED, "the kernel module was imported before conftest.py set TRITON_INTERPRET=1"

SEED = 1234
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def eager_lora(x, weight, bias, lora_a, lora_b, scale, mask):
    """The reference: ``x Wᵀ + bias + scale · (x ⊙ mask) Aᵀ Bᵀ`` in plain torch ops."""
    y = x @ weight.T + scale * ((x * mask) @ lora_a.T) @ lora_b.T
    return y if bias is None else y + bias


def eager_dora(x, weight, bias, lora_a, lora_b, magnitude, scale):
    """The reference: ``(m / ‖W + s·BA‖) ⊙ (x Wᵀ + s · x Aᵀ Bᵀ) + bias``, the norm detached."""
    norm = torch.linalg.norm(weight + scale * lora_b @ lora_a, dim=1).detach()
    y = (magnitude / norm) * (x @ weight.T + scale * (x @ lora_a.T) @ lora_b.T)
    return y if bias is None else y + bias


def make_inputs(T, k, n, r, dtype, bias, gen_seed=0):
    gen = torch.Generator().manual_seed(gen_seed)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    return {
        "x": rand(T, k).requires_grad_(),
        "weight": rand(n, k, std=k**-0.5),
        "bias": rand(n).requires_grad_() if bias else None,
        "lora_a": rand(r, k, std=k**-0.5).requires_grad_(),
        "lora_b": rand(n, r, std=r**-0.5).requires_grad_(),
    }


def assert_close(got, want, dtype, what):
    """Equal within the dtype's tolerance, relative to the largest entry of the reference."""
    error = (got.double() - want.double()).abs().max().item()
    bound = TOLERANCE[dtype] * max(want.double().abs().max().item(), 1.0)
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g}"


def fp64_leaves(inputs):
    """The reference's inputs: the same (already rounded) values in fp64, as fresh leaves."""
    return {name: t if t is None else t.detach().double().requires_grad_(t.requires_grad) for name, t in inputs.items()}


def assert_outputs_and_grads_close(y, y_ref, inputs, ref, names, dtype):
    """The output, and the gradient of each named input that is present, within tolerance."""
    assert_close(y, y_ref, dtype, "output")
    for name in names:
        if inputs[name] is not None:
            assert_close(inputs[name].grad, ref[name].grad, dtype, f"grad of {name}")


@pytest.mark.parametrize(
    "T, k, n, r, p, bias, dtype",
    [
        (37, 45, 29, 4, 0.0, True, torch.float32),  # nothing a multiple of a block
        (37, 45, 29, 4, 0.25, False, torch.float32),
        (64, 96, 96, 16, 0.1, True, torch.float32),
        (50, 64, 80, 64, 0.0, False, torch.float32),
        (64, 96, 72, 64, 0.3, True, torch.float32),
        (48, 64, 64, 16, 0.2, True, torch.bfloat16),
        (33, 40, 48, 8, 0.1, False, torch.float16),
    ],
    ids=lambda value: str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None,
)
def test_matches_eager_reference(T, k, n, r, p, bias, dtype):
    scale = 3.0 / r**0.5  # rsLoRA-style; never 1, so a dropped scale shows
    fused = make_inputs(T, k, n, r, dtype, bias)
    y = fused_lora_linear(**fused, scale=scale, dropout_p=p, seed=SEED)
    grad = torch.randn(T, n, generator=torch.Generator().manual_seed(1)).to(dtype)
    y.backward(grad)

    mask = dropout_mask((T, k), p, SEED)
    if p > 0:
        assert 0 < (mask == 0).float().mean() < 1, "dropout dropped nothing or everything"
    # Reference in fp64 from the same (rounded) inputs and the same mask.
    ref = fp64_leaves(fused)
    y_ref = eager_lora(**ref, scale=scale, mask=mask.double())
    y_ref.backward(grad.double())

    assert y.dtype == dtype and y.shape == (T, n)
    assert_outputs_and_grads_close(y, y_ref, fused, ref, ("x", "lora_a", "lora_b", "bias"), dtype)
    assert fused["weight"].grad is None


def test_dropout_mask_is_seeded_and_scaled():
    p = 0.3
    mask = dropout_mask((40, 50), p, SEED)
    assert torch.equal(mask, dropout_mask((40, 50), p, SEED))
    assert not torch.equal(mask, dropout_mask((40, 50), p, SEED + 1))
    assert torch.all((mask == 0) | torch.isclose(mask, torch.tensor(1 / (1 - p))))
    assert abs((mask == 0).float().mean().item() - p) < 0.05


def test_batch_dims_eval_mode_and_input_without_grad():
    inputs = make_inputs(24, 40, 36, 8, torch.float32, bias=True)
    x = inputs.pop("x").detach()[None].expand(2, 24, 40)  # leading dims, a non-contiguous view
    y = fused_lora_linear(x, **inputs, scale=0.5, dropout_p=0.5, seed=SEED, training=False)
    y.sum().backward()

    ref = {name: t.detach().requires_grad_(t.requires_grad) for name, t in inputs.items()}
    y_ref = eager_lora(x, **ref, scale=0.5, mask=torch.ones(()))  # eval: no dropout
    y_ref.sum().backward()
    assert y.shape == (2, 24, 36)
    assert_close(y, y_ref, torch.float32, "output")
    for name in ("lora_a", "lora_b", "bias"):
        assert_close(inputs[name].grad, ref[name].grad, torch.float32, f"grad of {name}")


def test_rejects_trainable_base_weight_and_bad_shapes():
    inputs = make_inputs(8, 16, 16, 4, torch.float32, bias=False)
    inputs["weight"].requires_grad_()
    with pytest.raises(ValueError, match="frozen"):
        fused_lora_linear(**inputs, scale=1.0)
    with torch.no_grad():  # inference never forms dW, so a trainable W is fine there
        fused_lora_linear(**inputs, scale=1.0)
    inputs["weight"].requires_grad_(False)
    inputs["lora_b"] = torch.zeros(16, 5)
    with pytest.raises(ValueError, match=r"lora_b has shape \(16, 5\)"):
        fused_lora_linear(**inputs, scale=1.0)


# --------------------------------------------------------------------------------------------
# DoRA
# --------------------------------------------------------------------------------------------


def make_dora_inputs(T, k, n, r, dtype, bias):
    """``make_inputs`` plus an fp32 magnitude moved off ‖W‖, so that m / ‖W + s·BA‖ is far from 1."""
    inputs = make_inputs(T, k, n, r, dtype, bias)
    spread = 1 + 0.5 * torch.rand(n, generator=torch.Generator().manual_seed(2))
    inputs["magnitude"] = (inputs["weight"].float().norm(dim=1) * spread).requires_grad_()
    return inputs


@pytest.mark.parametrize(
    "T, k, n, r, bias, dtype",
    [
        (37, 45, 29, 4, True, torch.float32),  # nothing a multiple of a block
        (37, 45, 29, 16, False, torch.float32),
        (50, 64, 80, 64, True, torch.float32),
        (48, 64, 64, 16, True, torch.bfloat16),
        (33, 40, 48, 4, False, torch.float16),
    ],
    ids=lambda value: str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None,
)
def test_dora_matches_eager_reference(T, k, n, r, bias, dtype):
    scale = 3.0 / r**0.5
    fused = make_dora_inputs(T, k, n, r, dtype, bias)
    y = fused_lora_linear(**fused, scale=scale)
    grad = torch.randn(T, n, generator=torch.Generator().manual_seed(1)).to(dtype)
    y.backward(grad)

    ref = fp64_leaves(fused)
    y_ref = eager_dora(**ref, scale=scale)
    y_ref.backward(grad.double())

    assert y.dtype == dtype and y.shape == (T, n)
    assert_outputs_and_grads_close(y, y_ref, fused, ref, ("x", "lora_a", "lora_b", "magnitude", "bias"), dtype)
    assert fused["magnitude"].grad.dtype == torch.float32
    assert fused["weight"].grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dora_row_norm_matches_the_direct_norm(dtype):
    inputs = make_inputs(8, 45, 29, 16, dtype, bias=False)
    weight, lora_a, lora_b = inputs["weight"], inputs["lora_a"], inputs["lora_b"]
    direct = torch.linalg.norm(weight.double() + 0.75 * lora_b.double() @ lora_a.double(), dim=1)
    norm = dora_row_norm(weight, lora_a, lora_b, 0.75)
    assert norm.dtype == torch.float32 and not norm.requires_grad  # a constant for backward
    assert_close(norm, direct, torch.float32, "norm")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # must not drop the products to bf16
        assert_close(dora_row_norm(weight, lora_a, lora_b, 0.75), direct, torch.float32, "norm under autocast")


def test_dora_with_a_frozen_magnitude():
    # Y is then not saved and no magnitude gradient is summed; the others must not change.
    fused = make_dora_inputs(37, 45, 29, 4, torch.float32, bias=True)
    fused["magnitude"].requires_grad_(False)
    fused_lora_linear(**fused, scale=0.5).square().sum().backward()
    ref = {name: t.detach().double().requires_grad_(t.requires_grad) for name, t in fused.items()}
    eager_dora(**ref, scale=0.5).square().sum().backward()
    for name in ("x", "lora_a", "lora_b", "bias"):
        assert_close(fused[name].grad, ref[name].grad, torch.float32, f"grad of {name}")


def test_dora_refuses_dropout_while_training():
    inputs = make_dora_inputs(8, 16, 16, 4, torch.float32, bias=False)
    with pytest.raises(ValueError, match="DoRA"):
        fused_lora_linear(**inputs, scale=1.0, dropout_p=0.1)
    fused_lora_linear(**inputs, scale=1.0, dropout_p=0.1, training=False)  # eval: no dropout


# --------------------------------------------------------------------------------------------
# the plugin
# --------------------------------------------------------------------------------------------


class StandInLoraLinear(nn.Module):
    """What ``ftengine.plugins.lora.layer.LoraLinear`` exposes to ``ftengine_lora_kernel``."""

    def __init__(self, base, r, alpha, dropout, variant=None):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, base.out_features, bias=False)})
        nn.init.normal_(self.lora_B["default"].weight)  # nonzero, unlike a fresh adapter
        self.lora_dropout = nn.ModuleDict({"default": nn.Dropout(dropout) if dropout else nn.Identity()})
        self.scaling = {"default": alpha / r}
        self.variant = {"default": variant}
        self.merged = False

    def eager(self, x, mask):
        A, B = self.lora_A["default"].weight, self.lora_B["default"].weight
        return eager_lora(x, self.base_layer.weight, self.base_layer.bias, A, B, self.scaling["default"], mask)


class LinearSubclass(nn.Linear):
    """A subclass may compute otherwise than nn.Linear does: it falls back."""


def stand_in(k=24, n=20, r=4, dropout=0.0, **kwargs):
    torch.manual_seed(0)
    return StandInLoraLinear(nn.Linear(k, n), r, alpha=8, dropout=dropout, **kwargs)


def test_unsupported_reasons(monkeypatch):
    assert fused_lora.unsupported_reason(stand_in(), "default") is None  # CPU, interpreted
    monkeypatch.setattr(fused_lora, "_interpreted", lambda: False)
    merged = stand_in()
    merged.merged = True
    cases = {
        "adapter merged into the base weight": merged,
        "LoRA variant 'object' not supported": stand_in(variant=object()),
        "base layer LinearSubclass not supported": StandInLoraLinear(LinearSubclass(8, 8), 4, 8, 0.0),
        "r > 128": stand_in(r=129),
        "dtype torch.float64 not supported": stand_in().double(),
        "not on a CUDA device": stand_in(),
    }
    for expected, layer in cases.items():
        assert fused_lora.unsupported_reason(layer, "default") == expected


def test_dora_is_fused_without_dropout_only():
    from ftengine.plugins.dora import DORA

    assert fused_lora.unsupported_reason(stand_in(variant=DORA), "default") is None
    assert fused_lora.unsupported_reason(stand_in(dropout=0.1, variant=DORA), "default") == (
        "DoRA with dropout > 0 not supported (W·dropout(x) needs a second base GEMM)"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")
def test_hook_declines_without_cuda_or_interpreter(monkeypatch):
    monkeypatch.setattr(fused_lora, "_interpreted", lambda: False)
    layer = stand_in()
    assert fused_lora.ftengine_lora_kernel(layer=layer, name="default") is None
    assert fused_lora.summary(layer) == "fused_lora: inactive (no CUDA device)"


def test_hook_fuses_supported_layers_and_summarises():
    # Under the interpreter CPU layers are fused; the variant layer must still fall back.
    layer, variant = stand_in(dropout=0.2), stand_in(variant=object())
    forward = fused_lora.ftengine_lora_kernel(layer=layer, name="default")
    assert fused_lora.ftengine_lora_kernel(layer=variant, name="default") is None
    assert (layer.fused_lora_decisions, variant.fused_lora_decisions) == (
        {"default": None},
        {"default": "LoRA variant 'object' not supported"},
    )
    assert fused_lora.summary(nn.ModuleList([layer, variant])) == (
        "fused_lora (Triton interpreter: slow): 1 layers fused, 1 fell back (LoRA variant 'object' not supported: 1)"
    )
    # Decisions belong to the layers: another model's summary does not count them.
    assert fused_lora.summary(nn.ModuleList([stand_in()])) == "fused_lora (Triton interpreter: slow): 0 layers fused, 0 fell back"

    x = torch.randn(2, 9, 24, requires_grad=True)
    torch.manual_seed(7)
    y = forward(x)
    torch.manual_seed(7)  # the same draw gives the same seed, hence the same mask
    mask = dropout_mask((18, 24), 0.2, int(torch.randint(2**31 - 1, ()).item())).reshape(2, 9, 24)
    assert_close(y, layer.eager(x, mask), torch.float32, "training output")
    assert not torch.equal(forward(x), y), "each call must draw a fresh dropout seed"

    y.sum().backward()
    assert layer.lora_A["default"].weight.grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None

    layer.eval()
    assert_close(forward(x), layer.eager(x, torch.ones(())), torch.float32, "eval output")


def test_forward_casts_fp32_adapter_to_activation_dtype():
    layer = stand_in()
    layer.base_layer.to(torch.bfloat16)  # bf16 base, fp32 adapter weights (as PEFT keeps them)
    x = torch.randn(16, 24).to(torch.bfloat16)
    y = fused_lora.fused_forward(layer, "default")(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16
    assert layer.lora_A["default"].weight.grad.dtype == torch.float32
    reference = layer.to(torch.float64).eager(x.double(), torch.ones(()))
    assert_close(y, reference, torch.bfloat16, "output")


def outputs_and_grads(layer, x, params):
    """The output of ``layer`` on ``x`` and the gradients of x and ``params`` for a square loss."""
    inputs = x.clone().requires_grad_()
    y = layer(inputs)
    y.square().sum().backward()
    grads = [inputs.grad] + [p.grad for p in params]
    layer.zero_grad()
    return [y.detach()] + grads


def test_lora_layer_gives_the_same_outputs_and_gradients_with_the_kernel():
    layers = pytest.importorskip("ftengine.plugins.lora.layer", reason="the lora plugin is not installed")
    torch.manual_seed(0)
    layer = layers.LoraLinear(nn.Linear(40, 36).requires_grad_(False))
    layer.add_adapter("default", r=8, alpha=16, dropout=0.1)
    layer.set_active_adapter("default")
    nn.init.normal_(layer.lora_B["default"].weight)
    layer.eval()  # dropout off: the eager layer and the kernel then see the same input
    x = torch.randn(2, 11, 40)
    params = (layer.lora_A["default"].weight, layer.lora_B["default"].weight)

    eager = outputs_and_grads(layer, x, params)
    layer.kernel["default"] = fused_lora.fused_forward(layer, "default")
    fused = outputs_and_grads(layer, x, params)
    for what, got, want in zip(("output", "grad of x", "grad of A", "grad of B"), fused, eager):
        assert_close(got, want, torch.float32, what)


def test_dora_layer_gives_the_same_outputs_and_gradients_with_the_kernel():
    from ftengine.plugins.dora import DORA
    from ftengine.plugins.lora.layer import LoraLinear

    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(40, 36).requires_grad_(False))
    layer.add_adapter("default", r=8, alpha=16, dropout=0.0, variant=DORA)
    layer.set_active_adapter("default")
    with torch.no_grad():  # a nonzero B and a moved magnitude, so neither is a no-op
        nn.init.normal_(layer.lora_B["default"].weight)
        layer.lora_magnitude_vector["default"].mul_(1 + 0.5 * torch.rand(36))
    layer.train()
    x = torch.randn(2, 11, 40)
    params = (
        layer.lora_A["default"].weight,
        layer.lora_B["default"].weight,
        layer.lora_magnitude_vector["default"],
    )

    eager = outputs_and_grads(layer, x, params)
    layer.kernel["default"] = fused_lora.ftengine_lora_kernel(layer=layer, name="default")
    assert layer.kernel["default"] is not None
    fused = outputs_and_grads(layer, x, params)
    whats = ("output", "grad of x", "grad of A", "grad of B", "grad of the magnitude")
    for what, got, want in zip(whats, fused, eager):
        assert_close(got, want, torch.float32, what)


def test_a_cpu_run_reports_the_plugin_inactive_and_trains_eagerly(run_overrides, capsys, monkeypatch):
    from ftengine.build import configure
    from ftengine.loop import train

    monkeypatch.setattr(fused_lora, "_interpreted", lambda: False)
    config, pm = configure(None, ["lora", "fused_lora"], run_overrides + ["train.max_steps=2"])
    train(config, pm)
    assert "fused_lora: inactive (no CUDA device)" in capsys.readouterr().err


def training_metrics(run_overrides, output_dir, plugins, steps):
    """``{"loss": [...], "grad_norm": [...]}`` per step of a run on the tiny model, every linear
    layer adapted, LoRA dropout 0 (so that eager and fused layers see the same inputs). The
    gradient norm is logged before clipping: Adam's steps barely change when a gradient is
    rescaled, the norm does."""
    from ftengine.build import configure
    from ftengine.loop import train

    overrides = ["lora.dropout=0", "lora.target_modules=all-linear", f"train.max_steps={steps}"]
    config, pm = configure(None, plugins, run_overrides + overrides + [f"output_dir={output_dir}"])
    train(config, pm)
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [record for record in records if "loss" in record]
    return {key: [record[key] for record in steps] for key in ("loss", "grad_norm")}


def test_a_training_run_gives_the_same_losses_with_the_plugin(run_overrides, tmp_path, capsys):
    """Four steps of LoRA on the tiny model, every linear layer fused (through the interpreter)
    or eager: the same losses and gradient norms."""
    eager = training_metrics(run_overrides, tmp_path / "eager", ["lora"], steps=4)
    fused = training_metrics(run_overrides, tmp_path / "fused", ["lora", "fused_lora"], steps=4)
    assert "fused_lora (Triton interpreter: slow): 14 layers fused, 0 fell back" in capsys.readouterr().err
    assert len(fused["loss"]) == len(eager["loss"]) == 4
    for key in ("loss", "grad_norm"):
        assert fused[key] == pytest.approx(eager[key], rel=1e-5), key
    assert eager["loss"][-1] < eager["loss"][0]


def test_a_dora_training_run_gives_the_same_losses_with_the_plugin(run_overrides, tmp_path, capsys):
    """As above with DoRA, so the magnitude trains too. Three steps and no evaluation, since the
    interpreter is slow."""
    no_eval = run_overrides + ["data.eval=null"]
    eager = training_metrics(no_eval, tmp_path / "eager", ["lora", "dora"], steps=3)
    fused = training_metrics(no_eval, tmp_path / "fused", ["lora", "dora", "fused_lora"], steps=3)
    assert "fused_lora (Triton interpreter: slow): 14 layers fused, 0 fell back" in capsys.readouterr().err
    assert len(fused["loss"]) == len(eager["loss"]) == 3
    for key in ("loss", "grad_norm"):
        assert fused[key] == pytest.approx(eager[key], rel=1e-5), key
    assert eager["loss"][-1] < eager["loss"][0]


# --------------------------------------------------------------------------------------------
# QLoRA: an NF4 base, dequantised inside the GEMMs
# --------------------------------------------------------------------------------------------


def linear4bit(k, n, bias=True, double_quant=True, blocksize=64, quant_type="nf4", compute_dtype=torch.float32):
    """A bitsandbytes ``Linear4bit`` quantised from a seeded ``nn.Linear``, as ``qlora`` builds it."""
    torch.manual_seed(0)
    options = qlora.QloraOptions(double_quant=double_quant, blocksize=blocksize, quant_type=quant_type)
    return qlora.quantize_linear(nn.Linear(k, n, bias=bias), options, compute_dtype).requires_grad_(False)


def bnb_weight(layer):
    """The weight bitsandbytes' own dequantisation gives (fp32, the dtype it was quantised from)."""
    return bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def flat_layout_weight(layer):
    """NF4 by its definition, in torch ops: W.flatten()[f] = code[nibble f] · absmax[f // blocksize],
    the high nibble of byte f // 2 for even f."""
    weight = nf4_weight(layer.weight)
    n, k = weight.shape
    flat = torch.arange(n * k)
    byte = weight.packed[flat // 2].long()
    nibble = torch.where(flat % 2 == 0, byte >> 4, byte & 0xF)
    return (weight.code[nibble] * weight.absmax[flat // weight.blocksize]).reshape(n, k)


@pytest.mark.parametrize(
    "n, k, double_quant, blocksize",
    [
        (29, 45, True, 64),  # odd k and odd n·k: rows start mid-byte and mid-block
        (29, 45, False, 64),  # fp32 scales, stored as they are
        (36, 46, True, 32),  # n·k = 1656, not a multiple of 128; 64-wide tiles span 3 blocks
        (40, 200, True, 128),
        (64, 64, True, 64),  # rows aligned to blocks
    ],
)
def test_nf4_loader_matches_bitsandbytes_bitwise(n, k, double_quant, blocksize):
    layer = linear4bit(k, n, double_quant=double_quant, blocksize=blocksize)
    assert layer.weight.quant_state.nested == double_quant
    assert torch.equal(dequantize_nf4(nf4_weight(layer.weight)), bnb_weight(layer))


def test_nf4_loader_keeps_the_flat_layout_where_the_bitsandbytes_cpu_kernel_does_not():
    """bitsandbytes 0.50.2's CPU dequantisation (on this AVX512 machine) puts the wrong scales
    on rows whose width is a multiple of 16 but not of the blocksize; its quantiser and its
    generic torch dequantisation use the flat layout, as the loader does."""
    layer = linear4bit(32, 16)
    assert torch.equal(dequantize_nf4(nf4_weight(layer.weight)), flat_layout_weight(layer))


def test_nf4_block_scales_are_cached_per_weight_and_recomputed_when_their_source_changes():
    layer = linear4bit(45, 29)
    state = layer.weight.quant_state
    first = nf4_weight(layer.weight).absmax
    assert nf4_weight(layer.weight).absmax is first
    state.absmax = state.absmax.clone()  # as QuantState.to swaps it for a copy on another device
    assert nf4_weight(layer.weight).absmax is not first
    state.offset += 0.5  # in place: the same tensor, a new version
    assert torch.allclose(nf4_weight(layer.weight).absmax, first + 0.5)
    assert torch.equal(dequantize_nf4(nf4_weight(layer.weight)), bnb_weight(layer))


@pytest.mark.parametrize(
    "T, k, n, r, p, bias, dtype",
    [
        (37, 45, 29, 4, 0.0, True, torch.float32),  # nothing a multiple of a block
        (37, 45, 29, 16, 0.25, False, torch.float32),
        (50, 64, 80, 64, 0.1, True, torch.float32),
        (48, 46, 40, 16, 0.2, True, torch.bfloat16),
        (33, 40, 48, 64, 0.0, False, torch.bfloat16),
        (33, 40, 48, 4, 0.1, True, torch.float16),
    ],
    ids=lambda value: str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None,
)
def test_nf4_base_matches_eager_reference(T, k, n, r, p, bias, dtype):
    """The reference multiplies by bitsandbytes' dequantised weight, rounded to the compute
    dtype as its matmul does."""
    scale = 3.0 / r**0.5
    base = linear4bit(k, n, bias=bias)
    fused = make_inputs(T, k, n, r, dtype, bias)
    y = fused_lora_linear(**{**fused, "weight": nf4_weight(base.weight)}, scale=scale, dropout_p=p, seed=SEED)
    grad = torch.randn(T, n, generator=torch.Generator().manual_seed(1)).to(dtype)
    y.backward(grad)

    ref = fp64_leaves(fused)
    ref["weight"] = bnb_weight(base).to(dtype).double()
    y_ref = eager_lora(**ref, scale=scale, mask=dropout_mask((T, k), p, SEED).double())
    y_ref.backward(grad.double())

    assert y.dtype == dtype and y.shape == (T, n)
    assert_outputs_and_grads_close(y, y_ref, fused, ref, ("x", "lora_a", "lora_b", "bias"), dtype)


def test_nf4_base_refuses_dora_and_a_malformed_weight():
    inputs = make_dora_inputs(8, 45, 29, 4, torch.float32, bias=False)
    inputs["weight"] = nf4_weight(linear4bit(45, 29).weight)
    with pytest.raises(ValueError, match="DoRA .* needs a dense weight"):
        fused_lora_linear(**inputs, scale=1.0)
    inputs.pop("magnitude")
    inputs["weight"] = inputs["weight"]._replace(absmax=inputs["weight"].absmax[:-1])
    with pytest.raises(ValueError, match="NF4 absmax is 20 x torch.float32, expected 21"):
        fused_lora_linear(**inputs, scale=1.0)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lora_layer_on_a_4bit_base_gives_the_same_outputs_and_gradients_with_the_kernel(compute_dtype):
    """The eager layer runs bitsandbytes' 4-bit matmul (in its compute dtype) and the LoRA
    branch in fp32; the kernel computes both in the compute dtype."""
    from ftengine.plugins.lora.layer import LoraLinear

    layer = LoraLinear(linear4bit(40, 36, compute_dtype=compute_dtype))
    layer.add_adapter("default", r=8, alpha=16, dropout=0.1)
    layer.set_active_adapter("default")
    nn.init.normal_(layer.lora_B["default"].weight)
    layer.base_layer.bias.requires_grad_()
    layer.eval()  # dropout off: the eager layer and the kernel then see the same input
    x = torch.randn(2, 11, 40)
    params = (layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.base_layer.bias)

    eager = outputs_and_grads(layer, x, params)
    layer.kernel["default"] = fused_lora.ftengine_lora_kernel(layer=layer, name="default")
    assert layer.kernel["default"] is not None
    fused = outputs_and_grads(layer, x, params)
    assert fused[0].dtype == torch.float32  # x's dtype, as Linear4bit returns
    assert torch.equal(fused[0].to(compute_dtype).float(), fused[0])  # computed in the compute dtype
    whats = ("output", "grad of x", "grad of A", "grad of B", "grad of the bias")
    for what, got, want in zip(whats, fused, eager):
        assert_close(got, want, compute_dtype, what)


def test_unsupported_reasons_on_a_4bit_base():
    from ftengine.plugins.dora import DORA

    nf4 = StandInLoraLinear(linear4bit(64, 32), 4, 8, 0.0)
    assert fused_lora.unsupported_reason(nf4, "default") is None
    fp4 = StandInLoraLinear(linear4bit(64, 32, quant_type="fp4"), 4, 8, 0.0)
    assert fused_lora.unsupported_reason(fp4, "default") == "4-bit base quant_type fp4 not supported (NF4 only)"
    dora = StandInLoraLinear(linear4bit(64, 32), 4, 8, 0.0, variant=DORA)
    assert fused_lora.unsupported_reason(dora, "default") == (
        "DoRA on a 4-bit base not supported (its row norms need the dense W)"
    )
    nf4.base_layer.weight.quant_state.packing_format_for_cpu = True
    assert fused_lora.unsupported_reason(nf4, "default") == "4-bit base in bitsandbytes' CPU inference packing"
    with pytest.raises(ValueError, match="CPU inference packing"):
        nf4_weight(nf4.base_layer.weight)


def test_a_qlora_training_run_gives_the_same_losses_with_the_plugin(run_overrides, tmp_path, capsys):
    """Three steps of LoRA on the tiny model quantised to NF4, every linear layer fused or
    eager: the same losses and gradient norms. Blocks of 32 weights, so that every layer's
    width (32 or 64) is a multiple of the block, where bitsandbytes' CPU kernel dequantises
    right (see the flat-layout test above); no evaluation, since the interpreter is slow."""
    no_eval = run_overrides + ["data.eval=null", "qlora.blocksize=32"]
    eager = training_metrics(no_eval, tmp_path / "eager", ["lora", "qlora"], steps=3)
    fused = training_metrics(no_eval, tmp_path / "fused", ["lora", "qlora", "fused_lora"], steps=3)
    assert "fused_lora (Triton interpreter: slow): 14 layers fused, 0 fell back" in capsys.readouterr().err
    assert len(fused["loss"]) == len(eager["loss"]) == 3
    for key in ("loss", "grad_norm"):
        assert fused[key] == pytest.approx(eager[key], rel=1e-5), key
    assert eager["loss"][-1] < eager["loss"][0]
