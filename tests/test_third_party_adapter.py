"""A third-party adapter method, (IA)³, published as a package (``tests/ia3_plugin``), works
through ftengine with no ftengine change: train, save in PEFT's format, load, generate, merge.

``make install`` installs the package (``pip install -e tests/ia3_plugin``); a checkout without
it skips these tests with the install command in the reason.
"""

import pytest
import torch
from ftengine.testing import tiny_model

peft = pytest.importorskip("peft")
ftengine_ia3 = pytest.importorskip("ftengine_ia3", reason="pip install -e tests/ia3_plugin (make install does)")
from ftengine_ia3.layer import ia3_layers, inject_adapter, select_targets  # noqa: E402

ATOL = 1e-5
TARGETS = ["k_proj", "v_proj", "down_proj"]
FEEDFORWARD = ["down_proj"]


def inputs():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 256, (2, 12), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@torch.no_grad()
def logits(model):
    return model(**inputs()).logits


@torch.no_grad()
def perturb_vectors(named_parameters, seed=3):
    """Move every (IA)³ vector away from ones, the same way for PEFT's model and ours."""
    generator = torch.Generator().manual_seed(seed)
    for _, parameter in sorted((n, p) for n, p in named_parameters if "ia3_l" in n):
        parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))


def peft_key_of(name):
    """PEFT's in-memory name ``base_model.model.<path>.ia3_l.default`` as our ``<path>.ia3_l.<name>``."""
    return name.removeprefix("base_model.model.")


# --------------------------------------------------------------------------------------------
# the layer itself, against PEFT's IA3 layer
# --------------------------------------------------------------------------------------------


def both_models():
    """PEFT's IA3 model and ours over the same tiny model, with the same vectors."""
    config = peft.IA3Config(task_type="CAUSAL_LM", target_modules=TARGETS, feedforward_modules=FEEDFORWARD)
    theirs = peft.get_peft_model(tiny_model(), config).eval()
    ours = tiny_model()
    inject_adapter(ours, select_targets(ours, TARGETS), "default", FEEDFORWARD)
    for _, layer in ia3_layers(ours):
        layer.set_active_adapter("default")
    perturb_vectors(theirs.named_parameters())
    with torch.no_grad():
        for name, parameter in ours.named_parameters():
            if "ia3_l" in name:
                parameter.copy_(theirs.get_parameter(f"base_model.model.{name}"))
    return theirs, ours


def test_layers_wrap_the_layers_peft_wraps_with_the_same_shapes():
    theirs, ours = both_models()
    expected = {peft_key_of(n): tuple(p.shape) for n, p in theirs.named_parameters() if "ia3_l" in n}
    assert {n: tuple(p.shape) for n, p in ours.named_parameters() if "ia3_l" in n} == expected
    assert {tuple(s) for s in expected.values()} == {(16, 1), (1, 64)}  # k/v outputs [out, 1]; down_proj input [1, in]


def test_layers_compute_what_peft_computes():
    theirs, ours = both_models()
    expected = logits(theirs)
    assert (expected - logits(tiny_model())).abs().max() > 1e-2, "the vectors must change the output"
    torch.testing.assert_close(logits(ours), expected, atol=ATOL, rtol=0)


def test_layers_merge_as_peft_merges():
    theirs, ours = both_models()
    theirs.merge_adapter()
    for _, layer in ia3_layers(ours):
        layer.merge()
    merged = {peft_key_of(n).replace(".base_layer", ""): p for n, p in theirs.named_parameters() if "base_layer" in n}
    for path, layer in ia3_layers(ours):
        torch.testing.assert_close(layer.base_layer.weight, merged[f"{path}.weight"], atol=0, rtol=0)
    torch.testing.assert_close(logits(ours), logits(theirs), atol=ATOL, rtol=0)
