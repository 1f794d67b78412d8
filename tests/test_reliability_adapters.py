"""Never lose a run, part two (issue 22): adapters and model files. Item 9, an adapter loaded
over another base with the same shapes, and the adapter and model-file cases of item 8. Each
test reproduced its failure first; the matrix is in docs/reliability.md.
"""

import json
import shutil
import warnings

import pytest
import torch
from click.testing import CliRunner
from ftengine.adapters import BASE_FILE, CONFIG_FILE, WEIGHTS_FILE
from ftengine.build import configure
from ftengine.cli import cli
from ftengine.errors import AdapterError
from ftengine.inference import load_for_inference
from ftengine.loop import train
from ftengine.serving import AdapterServer
from ftengine.testing import save_tiny_model
from safetensors.torch import load_file, save_file


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def one_line(text):
    return " ".join(text.split())


def trained(run_overrides, tmp_path, plugin):
    """The ``final/`` adapter of a two-step ``plugin`` run on the tiny model."""
    train(*configure(None, [plugin], run_overrides + ["train.max_steps=2"]))
    return tmp_path / "out" / "final"


@pytest.fixture
def lora_adapter(run_overrides, tmp_path):
    return trained(run_overrides, tmp_path, "lora")


@pytest.fixture
def other_base(tmp_path):
    """A tiny model with the same shapes as ``tiny_model_dir`` but other weights."""
    return save_tiny_model(tmp_path / "other-base", seed=1)


def generate(model, adapter, *options):
    return invoke("generate", "--model", model, "--adapter", f"a={adapter}", "--prompt", "Reverse: alpha", *options)


# --------------------------------------------------------------------------------------------
# 9. an adapter for another base with the same shapes loaded silently
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plugin", ["lora", "prompt_tuning"])
def test_9_an_adapter_over_another_base_warns_naming_both_bases(plugin, run_overrides, tmp_path, tiny_model_dir, other_base):
    adapter = trained(run_overrides, tmp_path, plugin)
    result = generate(other_base, adapter)
    assert result.exit_code == 0, result.output
    message = one_line(result.stderr)
    assert "warning" in message and str(tiny_model_dir) in message and str(other_base) in message, message
    assert "--strict" in message

    result = generate(other_base, adapter, "--strict")
    message = one_line(result.output)
    assert result.exit_code == 2 and str(tiny_model_dir) in message and str(other_base) in message, message
    assert "Traceback" not in result.output


def test_9_the_same_base_loads_without_a_word_and_peft_still_loads_the_adapter(lora_adapter, tiny_model_dir):
    recorded = json.loads((lora_adapter / BASE_FILE).read_text())
    assert recorded["base_model_name_or_path"] == str(tiny_model_dir) and recorded["fingerprint"]
    result = generate(tiny_model_dir, lora_adapter, "--strict")
    assert result.exit_code == 0 and "warning" not in result.stderr, result.output

    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft.PeftModel.from_pretrained(base, lora_adapter)
    about_our_files = [str(w.message) for w in caught if "nexpected" in str(w.message) or "ftengine" in str(w.message)]
    assert not about_our_files


def test_9_an_adapter_without_a_fingerprint_loads_with_at_most_a_note(lora_adapter, other_base):
    (lora_adapter / BASE_FILE).unlink()  # as PEFT and older ftengine versions write adapters
    result = generate(other_base, lora_adapter)
    assert result.exit_code == 0 and "warning" not in result.stderr, result.output
    result = generate(other_base, lora_adapter, "--strict")
    assert result.exit_code == 0 and "cannot check" in one_line(result.stderr), result.output


def test_9_merge_and_serve_refuse_another_base_under_strict(lora_adapter, other_base, tiny_model_dir, tmp_path):
    result = invoke("merge", "--model", other_base, "--adapter", lora_adapter, "--out", tmp_path / "merged", "--strict")
    assert result.exit_code == 2 and str(tiny_model_dir) in one_line(result.output), result.output
    assert not (tmp_path / "merged").exists()
    with pytest.raises(AdapterError, match="trained on"):
        AdapterServer(str(other_base), {"a": lora_adapter}, strict=True)
    server = AdapterServer(str(other_base), plugins=["lora"], strict=True)
    with pytest.raises(AdapterError, match="trained on"):
        server.load("a", lora_adapter)
    assert server.adapters == {}
    for command in ("generate", "merge", "serve"):
        assert "--strict" in invoke(command, "--help").output


def test_9_the_fingerprint_is_of_the_base_as_loaded_not_as_adapted(lora_adapter, tiny_model_dir):
    """Loading a second adapter (the first already injected) still compares with the base."""
    model, _, _ = load_for_inference(str(tiny_model_dir), {"a": lora_adapter, "b": lora_adapter}, strict=True)
    assert model is not None


# --------------------------------------------------------------------------------------------
# 8. a truncated base model, and adapters whose numbers are not numbers
# --------------------------------------------------------------------------------------------


def test_8_a_truncated_base_model_file_is_a_message(lora_adapter, tiny_model_dir, tmp_path):
    base = tmp_path / "truncated-base"
    shutil.copytree(tiny_model_dir, base)
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for args in (
        ["generate", "--model", base, "--prompt", "hi"],
        ["merge", "--model", base, "--adapter", lora_adapter, "--out", tmp_path / "m"],
    ):
        result = invoke(*args)
        message = one_line(result.output)
        assert result.exit_code == 2 and str(weights) in message and "truncated" in message, message
        assert "download" in message or "save" in message


@pytest.mark.parametrize("alpha", [1e308, float("inf"), float("nan")])
def test_8_a_non_finite_or_absurd_lora_alpha_is_refused(alpha, lora_adapter, tiny_model_dir):
    config_file = lora_adapter / CONFIG_FILE
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "lora_alpha": alpha}))
    result = generate(tiny_model_dir, lora_adapter)
    message = one_line(result.output)
    assert result.exit_code == 2 and str(config_file) in message and "lora_alpha" in message, message


@pytest.mark.parametrize("damage", ["nan", "inf", "int64", "overflow"])
def test_8_adapter_weights_that_are_not_finite_floats_are_refused(damage, lora_adapter, tiny_model_dir):
    weights = lora_adapter / WEIGHTS_FILE
    tensors = load_file(weights)
    name = next(k for k in tensors if "lora_A" in k)
    if damage == "int64":
        tensors[name] = (tensors[name] * 100).to(torch.int64)
    elif damage == "overflow":  # each finite, their product times alpha / r is not
        tensors = {k: torch.full_like(t, 1e30) for k, t in tensors.items()}
    else:
        tensors[name][0, 0] = float(damage)
    save_file(tensors, weights, metadata={"format": "pt"})
    result = generate(tiny_model_dir, lora_adapter)
    message = one_line(result.output)
    assert result.exit_code == 2 and str(weights) in message, message
    expected = {"nan": name, "inf": name, "int64": "int64", "overflow": "overflow"}[damage]
    assert expected in message, message
