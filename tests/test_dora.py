"""The dora plugin: the adapter contract, the DoRA formula, detached norms, bias, 4-bit bases."""

import pytest
import torch
import torch.nn.functional as F
from ftengine.adapter_contract import AdapterContract
from ftengine.build import build, configure
from ftengine.errors import AdapterError, PluginError
from ftengine.loop import save
from ftengine.methods import adapter_methods
from ftengine.plugins.dora import DORA
from ftengine.plugins.lora.layer import LoraLinear, dense_weight, lora_layers
from torch import nn


class TestDoraContract(AdapterContract):
    plugins = ["lora", "dora"]
    overrides = {"lora": {"r": 4, "dropout": 0.1}}


class TestDoraRsloraSubsetContract(AdapterContract):
    plugins = ["lora", "dora"]
    overrides = {"lora": {"r": 8, "rslora": True, "target_modules": ["k_proj", "down_proj"]}}


def dora_layer(base, r=3, alpha=6.0, dropout=0.0, seed=0):
    """A DoRA layer over ``base`` with non-zero A, B and a moved magnitude, active."""
    torch.manual_seed(seed)
    layer = LoraLinear(base)
    layer.add_adapter("d", r=r, alpha=alpha, dropout=dropout, variant=DORA)
    with torch.no_grad():
        nn.init.normal_(layer.lora_B["d"].weight, std=0.3)
        layer.lora_magnitude_vector["d"].mul_(1 + 0.2 * torch.rand(base.out_features))
    layer.set_active_adapter("d")
    return layer


def reference(layer, x):
    """DoRA by its definition: a linear layer with weight m ⊙ (W + sBA) / ‖W + sBA‖."""
    weight = dense_weight(layer.base_layer).float() + layer.delta_weight("d")
    adapted = layer.lora_magnitude_vector["d"].view(-1, 1) * weight / weight.norm(dim=1, keepdim=True)
    return F.linear(x, adapted, layer.base_layer.bias)


def test_magnitude_starts_at_the_row_norms_of_the_base_weight():
    base = nn.Linear(16, 8)
    layer = LoraLinear(base)
    layer.add_adapter("d", r=4, alpha=8, dropout=0.0, variant=DORA)
    torch.testing.assert_close(layer.lora_magnitude_vector["d"].detach(), base.weight.norm(dim=1))
    assert layer.lora_magnitude_vector["d"].requires_grad


@pytest.mark.parametrize("bias", [True, False])
def test_output_is_the_decomposed_weight_applied_to_x(bias):
    layer = dora_layer(nn.Linear(16, 8, bias=bias)).eval()
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), reference(layer, x), atol=1e-6, rtol=0)


def test_nothing_is_cached_the_output_follows_the_current_weights():
    layer = dora_layer(nn.Linear(16, 8)).eval()
    x = torch.randn(5, 16)
    layer(x)
    with torch.no_grad():
        layer.lora_B["d"].weight.mul_(-2)
        layer.lora_magnitude_vector["d"].add_(0.5)
        layer.base_layer.weight.mul_(1.5)
    torch.testing.assert_close(layer(x), reference(layer, x), atol=1e-6, rtol=0)


def test_training_mode_applies_dropout_to_both_terms_as_peft_does():
    layer = dora_layer(nn.Linear(16, 8), dropout=0.5).train()
    x = torch.randn(5, 16)
    torch.manual_seed(7)
    output = layer(x)
    torch.manual_seed(7)
    dropped = layer.lora_dropout["d"](x)
    weight = layer.base_layer.weight
    scale = layer.lora_magnitude_vector["d"] / (weight + layer.delta_weight("d")).norm(dim=1)
    expected = (
        layer.base_layer(x)
        + (scale - 1) * F.linear(dropped, weight)
        + scale * layer.scaling["d"] * F.linear(dropped, layer.delta_weight("d") / layer.scaling["d"])
    )
    torch.testing.assert_close(output, expected, atol=1e-6, rtol=0)


def test_the_weight_norm_is_a_constant_in_backward():
    """Gradients equal those of the reference with the norm detached, and differ from the
    gradients through the norm (so the test can tell them apart)."""
    layer = dora_layer(nn.Linear(16, 8)).eval()
    x = torch.randn(5, 16)
    params = [layer.lora_A["d"].weight, layer.lora_B["d"].weight, layer.lora_magnitude_vector["d"]]
    grads = torch.autograd.grad(layer(x).square().sum(), params)

    def manual(detach_norm):
        weight = layer.base_layer.weight + layer.delta_weight("d")
        norm = weight.norm(dim=1, keepdim=True)
        norm = norm.detach() if detach_norm else norm
        out = F.linear(x, layer.lora_magnitude_vector["d"].view(-1, 1) * weight / norm, layer.base_layer.bias)
        return torch.autograd.grad(out.square().sum(), params)

    for got, want in zip(grads, manual(detach_norm=True)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(grads[1], manual(detach_norm=False)[1], atol=1e-5)


def test_merge_and_unmerge_with_a_bias():
    layer = dora_layer(nn.Linear(16, 8)).eval()
    base_weight = layer.base_layer.weight.detach().clone()
    x = torch.randn(5, 16)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, atol=1e-6, rtol=0)
    torch.testing.assert_close(F.linear(x, layer.base_layer.weight, layer.base_layer.bias), unmerged, atol=1e-6, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, base_weight, atol=1e-6, rtol=0)


def test_a_4bit_base_layer_is_dequantised_for_the_norm():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    quantised = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
    quantised.load_state_dict(dense.state_dict())
    quantised = quantised.to("cpu")  # quantises the weight
    quantised.support_avx512bf16_for_cpu = False  # as qlora sets it: keep the weight layout
    layer = dora_layer(quantised).eval()
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), reference(layer, x), atol=1e-5, rtol=0)


def test_dora_requires_lora(tiny_model_dir):
    with pytest.raises(PluginError, match="plugin 'dora' requires plugin 'lora'"):
        configure(plugins=["dora"], base={"model": str(tiny_model_dir)}, require_data=False)


def test_a_dora_adapter_needs_the_dora_plugin_to_load(tiny_model_dir, tmp_path):
    run = TestDoraContract().build(tiny_model_dir, tmp_path)
    path = save(run.model, run.tokenizer, run.config, run.pm, tmp_path / "adapter")
    config, pm = configure(plugins=["lora"], base={"model": str(tiny_model_dir)}, require_data=False)
    model, _, _ = build(config, pm, training=False)
    with pytest.raises(AdapterError, match="a DoRA adapter \\(use_dora: true\\); activate the dora plugin \\(--plugin dora\\)"):
        adapter_methods(pm).load(model, path, "d", config)
    assert not lora_layers(model)


def test_a_4bit_weight_in_the_cpu_inference_packing_is_refused_not_misread():
    bnb = pytest.importorskip("bitsandbytes")
    quantised = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    quantised.weight.quant_state.packing_format_for_cpu = True  # what an AVX512-BF16 eval forward leaves
    with pytest.raises(AdapterError, match="support_avx512bf16_for_cpu = False"):
        dense_weight(quantised)
