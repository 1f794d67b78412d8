"""Adapters cross between ftengine and the installed PEFT both ways with the same logits."""

import json

import pytest
import torch
from ftengine.adapter_contract import AdapterContract
from ftengine.build import build, configure
from ftengine.inference import load_for_inference
from ftengine.loop import save, train
from safetensors import safe_open
from transformers import AutoModelForCausalLM

peft = pytest.importorskip("peft")

ATOL = 1e-5
LORA = {"r": 4, "alpha": 8, "dropout": 0.1}
CASES = {
    "lora-q-v": (["lora"], {"target_modules": ["q_proj", "v_proj"]}),
    "lora-all-linear": (["lora"], {"target_modules": "all-linear"}),
    "rslora-regex": (["lora"], {"rslora": True, "target_modules": r".*\.(k_proj|o_proj|up_proj)"}),
    "rslora-all-linear": (["lora"], {"rslora": True, "target_modules": "all-linear"}),
    "dora-q-v": (["lora", "dora"], {"target_modules": ["q_proj", "v_proj"]}),
    "dora-all-linear": (["lora", "dora"], {"target_modules": "all-linear"}),
}
logits = AdapterContract.logits


def base_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def peft_model_of(model_dir, adapter_dir):
    return peft.PeftModel.from_pretrained(base_model(model_dir), adapter_dir).eval()


def ftengine_adapter(model_dir, tmp_path, plugins, lora):
    """An ftengine adapter with every parameter moved from its init, saved; and its logits."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    base = {"model": str(model_dir), "data": {"train": str(data)}, "train": {"device": "cpu"}, "lora": {**LORA, **lora}}
    config, pm = configure(plugins=plugins, base=base)
    model, tokenizer, info = build(config, pm)
    AdapterContract.perturb(model.eval(), info["trainable"])
    return save(model, tokenizer, config, pm, tmp_path / "adapter"), logits(model)


def peft_adapter(model_dir, tmp_path, lora):
    """A PEFT adapter with every adapter parameter moved from its init, saved; and the model."""
    config = peft.LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        task_type="CAUSAL_LM",
        target_modules=lora["target_modules"],
        use_rslora=lora.get("rslora", False),
        use_dora=lora.get("use_dora", False),
    )
    model = peft.get_peft_model(base_model(model_dir), config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(tmp_path / "peft-adapter")
    return tmp_path / "peft-adapter", model.eval()


@pytest.mark.parametrize("case", CASES)
def test_ftengine_adapter_loads_in_peft_with_the_same_logits(case, tiny_model_dir, tmp_path):
    plugins, lora = CASES[case]
    path, expected = ftengine_adapter(tiny_model_dir, tmp_path, plugins, lora)
    got = logits(peft_model_of(tiny_model_dir, path))
    assert (expected - logits(base_model(tiny_model_dir))).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_in_ftengine_with_the_same_logits(case, tiny_model_dir, tmp_path):
    plugins, lora = CASES[case]
    path, peft_model = peft_adapter(tiny_model_dir, tmp_path, {**lora, "use_dora": "dora" in plugins})
    model, _, _ = load_for_inference(str(tiny_model_dir), {"peft": path})
    torch.testing.assert_close(logits(model), logits(peft_model), atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["lora-all-linear", "dora-all-linear"])
def test_training_forward_and_gradients_match_peft_dropout_included(case, tiny_model_dir, tmp_path):
    """Same dropout masks (same seed, same module order): same outputs and adapter gradients,
    so DoRA's detached norm and its handling of dropout match PEFT's."""
    plugins, lora = CASES[case]
    path, peft_model = peft_adapter(tiny_model_dir, tmp_path, {**lora, "use_dora": "dora" in plugins})
    model, _, _ = load_for_inference(str(tiny_model_dir), {"default": path})
    ours = {n: p.requires_grad_() for n, p in model.named_parameters() if ".lora_" in n}
    theirs = dict(peft_model.named_parameters())
    outputs = []
    for m in (model.train(), peft_model.train()):
        torch.manual_seed(0)
        out = m(**AdapterContract.inputs()).logits
        out.square().mean().backward()
        outputs.append(out.detach())
    torch.testing.assert_close(outputs[0], outputs[1], atol=ATOL, rtol=0)
    assert (outputs[0] - logits(model.eval())).abs().max() > 1e-3, "dropout must have been active"
    for name, parameter in ours.items():
        peft_name = f"base_model.model.{name}" + (".weight" if "lora_magnitude_vector" in name else "")
        torch.testing.assert_close(parameter.grad, theirs[peft_name].grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("case", ["lora-all-linear", "dora-q-v"])
def test_an_adapter_trained_by_ftengine_loads_in_peft(case, run_overrides, tiny_model_dir):
    plugins, lora = CASES[case]
    overrides = run_overrides + ["train.max_steps=3", "train.lr=5e-2", "lora.r=4"]
    overrides += [f"lora.target_modules={json.dumps(lora['target_modules'])}"]
    summary = train(*configure(None, plugins, overrides))
    ours, _, _ = load_for_inference(str(tiny_model_dir), {"trained": summary["saved"]})
    expected = logits(ours)
    assert (expected - logits(base_model(tiny_model_dir))).abs().max() > 1e-3
    torch.testing.assert_close(logits(peft_model_of(tiny_model_dir, summary["saved"])), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["lora-q-v", "dora-all-linear"])
def test_files_are_what_peft_writes(case, tiny_model_dir, tmp_path):
    plugins, lora = CASES[case]
    ours, _ = ftengine_adapter(tiny_model_dir, tmp_path / "ours", plugins, lora)
    theirs, _ = peft_adapter(tiny_model_dir, tmp_path / "theirs", {**lora, "use_dora": "dora" in plugins})
    config = json.loads((ours / "adapter_config.json").read_text())
    peft_config = json.loads((theirs / "adapter_config.json").read_text())
    assert config == {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(tiny_model_dir),
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.1,
        "target_modules": config["target_modules"],
        "use_rslora": False,
        "use_dora": "dora" in plugins,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    for key in config.keys() - {"base_model_name_or_path", "target_modules"}:
        assert peft_config[key] == config[key], key
    # Short names, as other adapter readers expect (PEFT 0.21 itself writes full paths for
    # all-linear and matches either by suffix: the parity tests above load ours in PEFT).
    assert config["target_modules"] == sorted({path.rsplit(".", 1)[-1] for path in peft_config["target_modules"]})
    files = []
    for directory in (ours, theirs):
        with safe_open(directory / "adapter_model.safetensors", framework="pt") as handle:
            files.append((handle.metadata(), sorted(handle.keys()), {k: handle.get_slice(k).get_shape() for k in handle.keys()}))
    assert files[0] == files[1]
    assert files[0][0] == {"format": "pt"}
