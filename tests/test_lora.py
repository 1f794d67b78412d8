"""The lora plugin: the adapter contract, targeting, config checks, loading checks, hooks, resume."""

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ftengine import checkpoint, hookimpl
from ftengine.adapter_contract import AdapterContract
from ftengine.build import build, configure
from ftengine.errors import AdapterError, ConfigError
from ftengine.inference import set_adapter
from ftengine.loop import save, train
from ftengine.methods import adapter_methods
from ftengine.plugins.lora.layer import LoraLinear, lora_layers, lora_scaling
from ftengine.state import RunState
from ftengine.testing import KillAfter, save_tiny_model, sft_rows, write_jsonl
from safetensors.torch import load_file, save_file
from torch import nn

ALL_LINEAR = [
    f"model.layers.{i}.{m}"
    for i in range(2)
    for m in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
]


class TestLoraContract(AdapterContract):
    plugins = ["lora"]
    overrides = {"lora": {"r": 4, "dropout": 0.1}}


class TestRsloraGaussianSubsetContract(AdapterContract):
    plugins = ["lora"]
    overrides = {"lora": {"r": 8, "alpha": 4, "rslora": True, "init": "gaussian", "target_modules": ["q_proj", "v_proj"]}}


def build_lora(model_dir, tmp_path, plugins=("lora",), **lora):
    data = write_jsonl(tmp_path / "train.jsonl", sft_rows(8))
    base = {"model": str(model_dir), "data": {"train": str(data)}, "train": {"device": "cpu"}, "lora": {"r": 4, **lora}}
    config, pm = configure(plugins=list(plugins), base=base)
    model, tokenizer, info = build(config, pm)
    return SimpleNamespace(model=model.eval(), tokenizer=tokenizer, info=info, config=config, pm=pm)


def run_state(run):
    """The state of a run on CPU that is about to train ``run.model``."""
    return RunState(config=run.config, pm=run.pm, output_dir=Path(run.config.output_dir), device=torch.device("cpu"))


def lora_shapes(linear, r):
    """The shapes of A and B of a rank-``r`` adapter of ``linear``."""
    return torch.Size([r, linear.in_features]), torch.Size([linear.out_features, r])


def wrapped(model):
    return [path for path, _ in lora_layers(model)]


# --------------------------------------------------------------------------------------------
# targeting and the layer
# --------------------------------------------------------------------------------------------


def test_all_linear_wraps_every_linear_layer_but_the_output_head(tiny_model_dir, tmp_path):
    run = build_lora(tiny_model_dir, tmp_path)
    assert wrapped(run.model) == ALL_LINEAR
    assert type(run.model.lm_head) is nn.Linear


@pytest.mark.parametrize(
    "targets, expected",
    [
        (r"model\.layers\.1\.self_attn\.(q|v)_proj", ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]),
        (r".*mlp\.down_proj", ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]),
        (
            ["q_proj", "layers.1.mlp.up_proj"],
            ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"],
        ),
    ],
)
def test_target_modules_regex_or_names(tiny_model_dir, tmp_path, targets, expected):
    assert wrapped(build_lora(tiny_model_dir, tmp_path, target_modules=targets).model) == expected


def test_target_modules_matching_nothing_names_the_pattern_and_real_layers(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError) as error:
        build_lora(tiny_model_dir, tmp_path, target_modules=["query", "value"])
    text = str(error.value)
    assert "lora.target_modules: ['query', 'value'] matches no linear layer" in text
    assert "model.layers.0.self_attn.q_proj" in text


@pytest.mark.parametrize(
    "lora, message",
    [
        ({"target_modules": "(q_proj"}, "lora.target_modules: '(q_proj' is not a valid regular expression"),
        ({"target_modules": []}, "lora.target_modules: the list is empty"),
        ({"alpha": 0}, "lora.alpha: Input should be greater than 0"),
        ({"adapter_name": "my.adapter"}, "lora.adapter_name: 'my.adapter' must be non-empty and without dots"),
        ({"dropout": 1.0}, "lora.dropout: Input should be less than 1"),
        ({"init": "pissa"}, "lora.init: Input should be 'kaiming' or 'gaussian'"),
    ],
)
def test_bad_options_are_config_errors_naming_the_key(tiny_model_dir, tmp_path, lora, message):
    with pytest.raises(ConfigError) as error:
        build_lora(tiny_model_dir, tmp_path, **lora)
    assert message in str(error.value)


def test_lora_conflicts_with_full(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="plugins 'full' and 'lora' conflict"):
        build_lora(tiny_model_dir, tmp_path, plugins=("lora", "full"))


def test_the_base_is_frozen_and_never_copied(tiny_model_dir, tmp_path):
    run = build_lora(tiny_model_dir, tmp_path)
    model, _ = run.pm.hook.ftengine_load_model(config=run.config)
    frozen = {n.replace(".base_layer.", "."): p.shape for n, p in run.model.named_parameters() if not p.requires_grad}
    assert frozen == {n: p.shape for n, p in model.named_parameters()}  # every base weight once, none copied
    adapter = {n: p.shape for n, p in run.model.named_parameters() if p.requires_grad}
    assert adapter == {  # r = 4
        f"{path}.lora_{ab}.default.weight": shape
        for path in ALL_LINEAR
        for ab, shape in zip("AB", lora_shapes(model.get_submodule(path), 4))
    }
    linears = {path: model.get_submodule(path) for path in ALL_LINEAR}
    adapter_methods(run.pm).inject(model, run.tokenizer, run.config)
    assert all(model.get_submodule(path).base_layer is linear for path, linear in linears.items())


@pytest.mark.parametrize("rslora, expected", [(False, 8 / 4), (True, 8 / 2)])
def test_scaling_is_alpha_over_r_or_over_sqrt_r(tiny_model_dir, tmp_path, rslora, expected):
    assert lora_scaling(8, 4, rslora) == expected
    run = build_lora(tiny_model_dir, tmp_path, alpha=8, rslora=rslora)
    assert {layer.scaling["default"] for _, layer in lora_layers(run.model)} == {expected}


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_initialisation_of_a_and_b(init):
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(256, 128))
    layer.add_adapter("a", r=16, alpha=16, dropout=0.0, init=init)
    a = layer.lora_A["a"].weight
    assert torch.count_nonzero(layer.lora_B["a"].weight) == 0
    if init == "kaiming":  # uniform(±1/sqrt(fan_in)), the nn.Linear default
        assert a.abs().max() <= 1 / math.sqrt(256) and a.abs().max() > 0.9 / math.sqrt(256)
    else:
        assert a.std().item() == pytest.approx(1 / 16, rel=0.05)
    assert layer.active_adapter is None
    assert torch.equal(layer(torch.ones(3, 256)), layer.base_layer(torch.ones(3, 256)))


def active_layer(in_features, out_features, r, alpha, dropout):
    """A seeded ``LoraLinear`` with adapter "a" active and a random (non-zero) B."""
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(in_features, out_features))
    layer.add_adapter("a", r=r, alpha=alpha, dropout=dropout)
    nn.init.normal_(layer.lora_B["a"].weight)
    layer.set_active_adapter("a")
    return layer


def test_layer_computes_base_plus_scaled_low_rank_update():
    layer = active_layer(8, 6, r=2, alpha=3, dropout=0.0)
    x = torch.randn(4, 8)
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    torch.testing.assert_close(layer(x), layer.base_layer(x) + 1.5 * x @ A.T @ B.T)


def test_dropout_draws_nn_dropouts_mask_and_scales_the_update_instead_of_the_input():
    layer = active_layer(64, 48, r=4, alpha=8, dropout=0.25)
    layer.train()
    x = torch.randn(3, 20, 64, requires_grad=True)
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    torch.manual_seed(1)
    output = layer(x)
    torch.manual_seed(1)
    expected = layer.base_layer(x) + 2 * nn.functional.dropout(x, 0.25, training=True) @ A.T @ B.T
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-4)  # the same random mask
    grads = torch.autograd.grad(output.square().sum(), [x, A, B])
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, A, B])
    for grad, expected_grad in zip(grads, expected_grads):
        # fp32 sums in another order: gradients near 20 differ by ~1e-3 on some CPUs (Xeon), a wrong
        # mask or scale by far more.
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base_layer(x) + 2 * x @ A.T @ B.T)


def test_under_bf16_autocast_the_adapter_computes_in_bf16_without_an_fp32_copy():
    layer = active_layer(64, 48, r=4, alpha=8, dropout=0.1)
    layer.train()
    x = torch.randn(3, 20, 64).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.profiler.profile(record_shapes=True) as profile:
        torch.manual_seed(1)
        output = layer(x)
    copies = [e for e in profile.events() if e.name == "aten::_to_copy"]
    assert output.dtype == torch.bfloat16
    assert not [e for e in copies if e.input_shapes and e.input_shapes[0] == [3, 20, 64]], "the activations stay bf16"
    torch.manual_seed(1)
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    expected = layer.base_layer(x.float()) + 2 * nn.functional.dropout(x.float(), 0.1, training=True) @ A.T @ B.T
    torch.testing.assert_close(output.float(), expected, rtol=2e-2, atol=0.1)


# --------------------------------------------------------------------------------------------
# hooks other plugins use
# --------------------------------------------------------------------------------------------


class DoublingKernel:
    """A kernel plugin whose 'fused' forward is recognisably not the eager one."""

    @hookimpl
    def ftengine_lora_kernel(self, layer, name):
        return lambda x: 2 * layer.base_layer(x)


def test_kernel_hook_result_is_used_only_while_the_adapter_is_active_and_unmerged(tiny_model_dir, tmp_path):
    run = build_lora(tiny_model_dir, tmp_path)
    run.pm.register(DoublingKernel())
    run.pm.hook.ftengine_on_train_start(
        model=run.model, tokenizer=run.tokenizer, datasets=SimpleNamespace(stats={}), state=run_state(run)
    )
    layer = run.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 32)
    assert callable(layer.kernel["default"])
    torch.testing.assert_close(layer(x), 2 * layer.base_layer(x))
    layer.merge()
    torch.testing.assert_close(layer(x), layer.base_layer(x))
    layer.unmerge()
    layer.set_active_adapter(None)
    torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_without_a_kernel_plugin_layers_run_eagerly(tiny_model_dir, tmp_path):
    run = build_lora(tiny_model_dir, tmp_path)
    run.pm.hook.ftengine_on_train_start(
        model=run.model, tokenizer=run.tokenizer, datasets=SimpleNamespace(stats={}), state=run_state(run)
    )
    assert all(layer.kernel == {"default": None} for _, layer in lora_layers(run.model))


def test_setting_an_unknown_adapter_names_the_loaded_ones(tiny_model_dir, tmp_path):
    run = build_lora(tiny_model_dir, tmp_path)
    with pytest.raises(AdapterError, match="no adapter named 'other' is loaded \\(loaded: default\\)"):
        set_adapter(run.model, run.pm, "other")


# --------------------------------------------------------------------------------------------
# loading: everything is checked before the model is touched
# --------------------------------------------------------------------------------------------


@pytest.fixture
def saved_adapter(tiny_model_dir, tmp_path):
    """A LoRA adapter (q_proj, v_proj) with non-zero B, saved by ftengine; and its logits."""
    run = build_lora(tiny_model_dir, tmp_path, target_modules=["q_proj", "v_proj"])
    AdapterContract.perturb(run.model, run.info["trainable"])
    path = save(run.model, run.tokenizer, run.config, run.pm, tmp_path / "adapter")
    return path, AdapterContract.logits(run.model)


def inference_build(model_dir, plugins=("lora",)):
    config, pm = configure(plugins=list(plugins), base={"model": str(model_dir)}, require_data=False)
    model, _, _ = build(config, pm, training=False)
    return model.eval(), config, pm


def load(model_dir, path, name="x", plugins=("lora",)):
    model, config, pm = inference_build(model_dir, plugins)
    model = adapter_methods(pm).load(model, path, name, config)
    adapter_methods(pm).activate(model, name)
    return model


def test_save_writes_peft_files_and_the_tokenizer(saved_adapter, tiny_model_dir):
    path, _ = saved_adapter
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["base_model_name_or_path"] == str(tiny_model_dir)
    assert sorted(load_file(path / "adapter_model.safetensors")) == [
        f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
        for i in (0, 1)
        for m in ("q_proj", "v_proj")
        for ab in "AB"
    ]
    assert (path / "tokenizer_config.json").is_file()


def test_loading_without_training_data_injects_nothing_but_the_loaded_adapter(saved_adapter, tiny_model_dir):
    path, logits = saved_adapter
    model = load(tiny_model_dir, path)
    assert {n for _, layer in lora_layers(model) for n in layer.lora_A} == {"x"}
    assert torch.equal(AdapterContract.logits(model), logits)


def snapshot(model):
    return [(name, type(module)) for name, module in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    modules, state = snapshot(model)
    assert modules == before[0]
    assert state.keys() == before[1].keys() and all(torch.equal(state[k], before[1][k]) for k in state)


def test_shape_mismatch_names_the_first_module_and_both_shapes_and_changes_nothing(saved_adapter, tmp_path):
    path, _ = saved_adapter
    other_dir = save_tiny_model(tmp_path / "wider", hidden_size=48)
    model, config, pm = inference_build(other_dir)
    before = snapshot(model)
    with pytest.raises(AdapterError) as error:
        adapter_methods(pm).load(model, path, "x", config)
    assert (
        "module 'model.layers.0.self_attn.q_proj': lora_A.weight has shape [4, 32] in the adapter but the base model needs [4, 48]"
        in str(error.value)
    )
    assert_unchanged(model, before)


def test_missing_module_is_named_and_changes_nothing_even_next_to_a_loaded_adapter(saved_adapter, tmp_path):
    path, _ = saved_adapter
    shallow_dir = save_tiny_model(tmp_path / "shallow", layers=1)
    model, config, pm = inference_build(shallow_dir)
    tensors = load_file(path / "adapter_model.safetensors")
    layer0 = tmp_path / "layer0"
    shutil.copytree(path, layer0)
    save_file(
        {k: v for k, v in tensors.items() if ".layers.0." in k}, layer0 / "adapter_model.safetensors", metadata={"format": "pt"}
    )
    adapter_methods(pm).load(model, layer0, "first", config)
    before = snapshot(model)
    with pytest.raises(
        AdapterError, match="weights for module 'model.layers.1.self_attn.q_proj', which the base model does not have"
    ):
        adapter_methods(pm).load(model, path, "x", config)
    assert_unchanged(model, before)


def test_a_targeted_module_without_weights_is_an_error(saved_adapter, tiny_model_dir, tmp_path):
    path, _ = saved_adapter
    tensors = load_file(path / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "layers.1.self_attn.v_proj" not in k}, path / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="no weights for module 'model.layers.1.self_attn.v_proj'"):
        load(tiny_model_dir, path)


def test_unknown_config_keys_are_dropped_with_a_warning(saved_adapter, tiny_model_dir):
    path, logits = saved_adapter
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "lora_future_option": 3, "rank_pattern": {}}))
    with pytest.warns(UserWarning, match="dropped key\\(s\\) unknown to ftengine: lora_future_option"):
        model = load(tiny_model_dir, path)
    assert torch.equal(AdapterContract.logits(model), logits)


def test_keys_a_config_leaves_out_take_peft_defaults_but_target_modules_is_required(saved_adapter, tiny_model_dir):
    path, logits = saved_adapter
    minimal = {"peft_type": "LORA", "r": 4, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(minimal))
    assert torch.equal(AdapterContract.logits(load(tiny_model_dir, path)), logits)
    (path / "adapter_config.json").write_text(json.dumps({**minimal, "target_modules": None}))
    with pytest.raises(AdapterError, match="target_modules is not set"):
        load(tiny_model_dir, path)


@pytest.mark.parametrize("key, value", [("bias", "all"), ("fan_in_fan_out", True), ("rank_pattern", {"q_proj": 8})])
def test_peft_options_ftengine_cannot_honour_are_errors(saved_adapter, tiny_model_dir, key, value):
    path, _ = saved_adapter
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(AdapterError, match=f"'{key}': .* is a PEFT option ftengine does not support"):
        load(tiny_model_dir, path)


def test_loading_twice_under_one_name_or_under_a_bad_name_is_an_error(saved_adapter, tiny_model_dir):
    path, _ = saved_adapter
    model, config, pm = inference_build(tiny_model_dir)
    adapter_methods(pm).load(model, path, "x", config)
    with pytest.raises(AdapterError, match="an adapter named 'x' is already loaded"):
        adapter_methods(pm).load(model, path, "x", config)
    with pytest.raises(AdapterError, match="adapter name 'x.y' must be non-empty and without dots"):
        adapter_methods(pm).load(model, path, "x.y", config)


# --------------------------------------------------------------------------------------------
# training: checkpoints hold the adapter only, and resume exactly
# --------------------------------------------------------------------------------------------


def losses(output_dir):
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def test_resumed_lora_run_matches_the_uninterrupted_one(run_overrides, tmp_path):
    overrides = run_overrides + ["train.max_steps=6", "train.save_every=3", "lora.r=4", "lora.dropout=0.2", "train.lr=1e-2"]
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    train(*configure(None, ["lora"], overrides + [f"output_dir={straight_dir}"]))

    config, pm = configure(None, ["lora"], overrides + [f"output_dir={resumed_dir}"])
    pm.register(KillAfter(4))
    with pytest.raises(KeyboardInterrupt):
        train(config, pm)
    (saved,) = checkpoint.checkpoint_dirs(resumed_dir)
    # The checkpoint holds the adapter (A and B of every targeted layer), not the frozen base.
    assert sorted(load_file(saved / "trainable.safetensors")) == sorted(
        f"{path}.lora_{ab}.default.weight" for path in ALL_LINEAR for ab in "AB"
    )
    train(*configure(None, ["lora"], overrides + [f"output_dir={resumed_dir}"]), resume=True)

    assert losses(resumed_dir) == losses(straight_dir) and len(losses(straight_dir)) == 6
    final = [load_file(d / "final" / "adapter_model.safetensors") for d in (straight_dir, resumed_dir)]
    assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][k], final[1][k]) for k in final[0])
