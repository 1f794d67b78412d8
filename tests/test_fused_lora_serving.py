"""The fused_lora kernel for mixed-adapter batches (``kernel.mixed_lora_``) against lora's eager
mixed path, run by Triton's interpreter on CPU: one layer, then a whole ``AdapterServer``.

Shapes stay tiny (the interpreter runs every program in Python); its blocks are 16-32 wide and
its rank slice 16, so a rank-20 adapter takes two passes of the kernel's rank loop.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ftengine.methods import adapter_methods
from ftengine.serving import AdapterServer
from test_serving import save_adapter
from torch import nn

pytest.importorskip("triton", reason="the fused_lora kernels are written in Triton, which is not installed")

from ftengine.plugins import fused_lora  # noqa: E402
from ftengine.plugins.dora import DORA  # noqa: E402
from ftengine.plugins.fused_lora import kernel  # noqa: E402
from ftengine.plugins.fused_lora.kernel import mixed_lora_  # noqa: E402
from ftengine.plugins.lora.layer import LoraLinear, lora_layers  # noqa: E402

assert kernel.INTERPRETED, "the kernel module was imported before conftest.py set TRITON_INTERPRET=1"

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}

# Two LoRA ranks (20 > the interpreter's rank slice of 16), rsLoRA, DoRA; "elsewhere" is an
# adapter of other layers: this layer lacks it, so its row gets the base alone.
LAYER_ADAPTERS = {
    "r4": {"r": 4, "alpha": 8},
    "r20": {"r": 20, "alpha": 16},
    "rs": {"r": 8, "alpha": 8, "rslora": True},
    "dora": {"r": 4, "alpha": 16, "variant": DORA},
}
LAYER_ROWS = [None, "r4", "r20", "rs", "dora", "elsewhere", "r4"]


def assert_close(got, want, dtype, what):
    """Equal within the dtype's tolerance, relative to the largest entry of the reference."""
    error = (got.double() - want.double()).abs().max().item()
    bound = TOLERANCE[dtype] * max(want.double().abs().max().item(), 1.0)
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g}"


def mixed_layer(bias, dtype=torch.float32, k=40, n=36):
    """A ``LoraLinear`` holding ``LAYER_ADAPTERS`` with nonzero B and a moved DoRA magnitude."""
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(k, n, bias=bias).to(dtype).requires_grad_(False))
    with torch.no_grad():
        for name, options in LAYER_ADAPTERS.items():
            layer.add_adapter(name, dropout=0.0, **options)
            nn.init.normal_(layer.lora_B[name].weight, std=0.5)
        layer.lora_magnitude_vector["dora"].mul_(1 + 0.5 * torch.rand(n))
    return layer.requires_grad_(False).eval()


def mixed_output(layer, x, rows, kernel_on):
    layer.rows_kernel = fused_lora.ftengine_lora_rows_kernel(layer=layer) if kernel_on else None
    assert (layer.rows_kernel is not None) == kernel_on
    layer.set_adapter_rows(rows)
    try:
        return layer(x)
    finally:
        layer.set_adapter_rows(None)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@torch.no_grad()
def test_the_kernel_gives_the_eager_mixed_output(bias):
    layer = mixed_layer(bias)
    x = torch.randn(len(LAYER_ROWS), 5, 40)
    eager = mixed_output(layer, x, LAYER_ROWS, kernel_on=False)
    fused = mixed_output(layer, x, LAYER_ROWS, kernel_on=True)
    assert fused.shape == eager.shape and fused.dtype == eager.dtype
    assert_close(fused, eager, torch.float32, "mixed output")
    # Each row is its adapter's output alone, and every adapter changes it, so a row given the
    # wrong adapter, scaling or column scale shows.
    base = layer.base_layer(x)
    for i, name in enumerate(LAYER_ROWS):
        layer.set_active_adapter(name)
        assert_close(fused[i], layer(x[i : i + 1])[0], torch.float32, f"row {i} ({name})")
        if name in LAYER_ADAPTERS:
            assert (fused[i] - base[i]).abs().max() > 1e-2, name
        else:
            assert torch.equal(fused[i], base[i]), "a row without an adapter here keeps the base output"
    layer.set_active_adapter(None)


@torch.no_grad()
def test_the_kernel_on_a_bf16_base_and_without_dora_rows():
    """A bf16 base (the adapters stay fp32) and a batch whose rows use no DoRA adapter though
    the stack holds one; tokens over two blocks of the interpreter's 16."""
    layer = mixed_layer(bias=True, dtype=torch.bfloat16)
    rows = ["r20", None, "rs", "r4"]
    x = torch.randn(len(rows), 19, 40).to(torch.bfloat16)
    eager = mixed_output(layer, x, rows, kernel_on=False)
    fused = mixed_output(layer, x, rows, kernel_on=True)
    assert fused.dtype == torch.bfloat16
    assert_close(fused, eager, torch.bfloat16, "mixed output")


def test_autograd_through_x_keeps_the_eager_path():
    """The kernel has no backward: where autograd records through x, lora gathers and runs its
    eager path, so x still gets its gradient."""
    layer = mixed_layer(bias=True)
    x = torch.randn(len(LAYER_ROWS), 3, 40, requires_grad=True)
    grads = []
    for kernel_on in (True, False):
        layer.rows_kernel = fused_lora.ftengine_lora_rows_kernel(layer=layer) if kernel_on else None
        layer.set_adapter_rows(LAYER_ROWS)
        layer(x).square().sum().backward()
        grads.append(x.grad.clone())
        x.grad = None
    layer.set_adapter_rows(None)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=0, rtol=0)


def test_mixed_lora_matches_a_per_row_reference_and_refuses_bad_shapes():
    """The kernel function on its own: adapter index −1 keeps the base row, DoRA's formula
    with its column scale, and a malformed call is refused naming the argument."""
    torch.manual_seed(1)
    rows, T, k, n, r = 4, 3, 24, 20, 6
    a, b = torch.randn(2, r, k), torch.randn(2, n, r)
    scaling, column_scale, bias = torch.tensor([0.5, 2.0]), 1 + torch.rand(2, n), torch.randn(n)
    x, base = torch.randn(rows, T, k), torch.randn(rows, T, n)
    adapter_of_row = torch.tensor([1, -1, 0, 1])
    y = mixed_lora_(base.clone(), x, adapter_of_row, a, b, scaling, column_scale, bias)
    for i, adapter in enumerate(adapter_of_row.tolist()):
        if adapter < 0:
            assert torch.equal(y[i], base[i])
            continue
        g = column_scale[adapter]
        want = base[i] + (g - 1) * (base[i] - bias) + g * scaling[adapter] * ((x[i] @ a[adapter].T) @ b[adapter].T)
        assert_close(y[i], want, torch.float32, f"row {i}")
    with pytest.raises(ValueError, match=r"lora_b has shape \(2, 20, 5\), expected \(2, 20, 6\)"):
        mixed_lora_(base.clone(), x, adapter_of_row, a, b[..., :5], scaling)
    with pytest.raises(ValueError, match="adapter_of_row must hold integers"):
        mixed_lora_(base.clone(), x, adapter_of_row.float(), a, b, scaling)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")
def test_the_hook_declines_without_cuda_or_interpreter(monkeypatch):
    monkeypatch.setattr(fused_lora, "_interpreted", lambda: False)
    layer = mixed_layer(bias=True)
    assert fused_lora.ftengine_lora_rows_kernel(layer=layer) is None
    assert layer.fused_lora_rows_decision == "no CUDA device"
    assert fused_lora.rows_summary(layer) == "fused_lora: mixed-adapter batches eager (no CUDA device)"


# --------------------------------------------------------------------------------------------
# a whole server
# --------------------------------------------------------------------------------------------

# As in test_serving.py: LoRA of two ranks, rsLoRA, DoRA, and an adapter on q/v only.
ADAPTERS = {
    "r4": (["lora"], {"r": 4}),
    "r8": (["lora"], {"r": 8, "alpha": 8}),
    "rs": (["lora"], {"r": 8, "rslora": True}),
    "dora": (["lora", "dora"], {"r": 4, "alpha": 16}),
    "qv": (["lora"], {"r": 2, "target_modules": ["q_proj", "v_proj"]}),
}
ROWS = [None, "r4", "r8", "rs", "dora", "qv"]
PROMPTS = ["Reverse: alpha", "Hi", "Reverse: the longest prompt", "abc", "x", "Reverse: beta"]


@pytest.fixture(scope="module")
def servers(tiny_model_dir, tmp_path_factory):
    """``(eager, fused)``: the same adapters over the tiny model, without and with fused_lora."""
    root = tmp_path_factory.mktemp("adapters")
    dirs = {
        name: save_adapter(tiny_model_dir, root / name, plugins, {"lora": lora}) for name, (plugins, lora) in ADAPTERS.items()
    }
    return AdapterServer(str(tiny_model_dir), dirs), AdapterServer(str(tiny_model_dir), dirs, plugins=["fused_lora"])


def test_a_server_with_fused_lora_runs_every_layer_through_the_kernel(servers):
    eager, fused = servers
    layers = len(lora_layers(fused.model))
    assert fused_lora.rows_summary(fused.model) == (
        f"fused_lora (Triton interpreter: slow): mixed-adapter batches in {layers} layers through the kernel, 0 eager"
    )
    assert all(layer.rows_kernel is None for _, layer in lora_layers(eager.model))


@torch.no_grad()
def test_a_mixed_batch_gives_the_same_logits_with_the_kernel(servers):
    input_ids = torch.randint(0, 256, (len(ROWS), 6), generator=torch.Generator().manual_seed(0))
    logits = []
    for server in servers:
        adapter_methods(server.pm).set_rows(server.model, ROWS)
        try:
            logits.append(server.model(input_ids=input_ids).logits)
        finally:
            adapter_methods(server.pm).set_rows(server.model, None)
    assert_close(logits[1], logits[0], torch.float32, "logits")


def test_greedy_generation_gives_the_same_tokens_with_the_kernel(servers):
    eager, fused = (server.generate(PROMPTS, adapters=ROWS, max_tokens=6, temperature=0) for server in servers)
    assert [c.token_ids for c in fused] == [c.token_ids for c in eager]
    # The adapters change what is generated, so a kernel serving the base would show.
    base = servers[0].generate(PROMPTS, adapters=None, max_tokens=6, temperature=0)
    assert sum(e.token_ids != b.token_ids for e, b in zip(eager, base)) >= 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")
def test_the_serving_benchmark_refuses_fused_without_cuda():
    script = Path(__file__).parent.parent / "examples" / "benchmarks" / "bench_serving.py"
    child = subprocess.run([sys.executable, str(script), "--smoke", "--fused"], capture_output=True, text=True, timeout=300)
    assert child.returncode == 2
    assert "--fused measures the fused_lora Triton kernel, which needs a CUDA device" in child.stderr
