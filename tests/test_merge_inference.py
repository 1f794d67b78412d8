"""Merging, hot-swapping several adapters, generation, and the merge/generate commands."""

import pytest
import torch
from click.testing import CliRunner
from ftengine.adapter_contract import AdapterContract
from ftengine.cli import cli
from ftengine.errors import AdapterError
from ftengine.inference import generate, load_for_inference, set_adapter
from ftengine.loop import save
from ftengine.methods import adapter_methods
from ftengine.plugins.lora.layer import lora_layers, unwrap_merged
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

logits = AdapterContract.logits


def saved_adapter(model_dir, tmp_path, plugins, **lora):
    """An adapter built by ftengine with every parameter moved from its init; and its logits."""
    contract = AdapterContract()
    contract.plugins, contract.overrides = plugins, {"lora": {"r": 4, **lora}}
    run = contract.build(model_dir, tmp_path)
    contract.perturb(run.model, run.info["trainable"])
    return save(run.model, run.tokenizer, run.config, run.pm, tmp_path / "adapter"), logits(run.model)


@pytest.fixture
def two_adapters(tiny_model_dir, tmp_path):
    """``{"qv": (dir, logits), "dora": (dir, logits)}``: LoRA on q/v, DoRA on all linear layers."""
    return {
        "qv": saved_adapter(tiny_model_dir, tmp_path / "qv", ["lora"], target_modules=["q_proj", "v_proj"]),
        "dora": saved_adapter(tiny_model_dir, tmp_path / "dora", ["lora", "dora"], alpha=16),
    }


@pytest.fixture
def base_logits(tiny_model_dir):
    return logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir))


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def flat(output):
    """Command output with rich's line wrapping undone."""
    return " ".join(output.split())


# --------------------------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qv", "dora"])
def test_merge_command_writes_a_plain_transformers_model_with_the_same_outputs(name, two_adapters, tiny_model_dir, tmp_path):
    adapter, expected = two_adapters[name]
    out = tmp_path / "merged"
    result = invoke("merge", "--model", tiny_model_dir, "--adapter", adapter, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"merged model written to {out}" in result.output
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    merged_tensors = load_file(out / "model.safetensors")
    assert {k: v.shape for k, v in merged_tensors.items()} == {k: v.shape for k, v in base.items()}  # no adapter left
    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=0)
    assert (out / "tokenizer_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dora", "merged", "qv"]  # no temporary left


def test_merge_of_a_directory_without_an_adapter_fails_cleanly(tiny_model_dir, tmp_path):
    out = tmp_path / "merged"
    result = invoke("merge", "--model", tiny_model_dir, "--adapter", tiny_model_dir, "--out", out)
    assert result.exit_code == 2
    assert "adapter_config.json: not found; is" in flat(result.output)
    assert not out.exists()


def test_unwrapping_refuses_an_active_adapter_that_is_not_merged(two_adapters, tiny_model_dir):
    model, _, _ = load_for_inference(str(tiny_model_dir), {"qv": two_adapters["qv"][0]})
    with pytest.raises(AdapterError, match="cannot unwrap 'model.layers.0.self_attn.q_proj': its active adapter is not merged"):
        unwrap_merged(model)


# --------------------------------------------------------------------------------------------
# several adapters over one base
# --------------------------------------------------------------------------------------------


def test_hot_swap_gives_each_adapters_own_outputs_without_reloading(two_adapters, tiny_model_dir, base_logits):
    model, _, pm = load_for_inference(str(tiny_model_dir), {name: path for name, (path, _) in two_adapters.items()})
    layers = [layer for _, layer in lora_layers(model)]
    assert torch.equal(logits(model), two_adapters["qv"][1])  # the first adapter is active
    for name in ("dora", "qv", None, "dora"):
        set_adapter(model, pm, name)
        assert torch.equal(logits(model), two_adapters[name][1] if name else base_logits), name
    assert [layer for _, layer in lora_layers(model)] == layers


def test_swapping_a_merged_adapter_unmerges_it_first(two_adapters, tiny_model_dir, base_logits):
    model, _, pm = load_for_inference(str(tiny_model_dir), {name: path for name, (path, _) in two_adapters.items()})
    adapter_methods(pm).merge(model)
    set_adapter(model, pm, "dora")
    torch.testing.assert_close(logits(model), two_adapters["dora"][1], atol=1e-5, rtol=0)
    adapter_methods(pm).merge(model)
    set_adapter(model, pm, None)
    torch.testing.assert_close(logits(model), base_logits, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------

PROMPTS = ["Reverse: alpha", "Hi", "Reverse: the longest prompt of the batch"]


def test_batched_generation_with_left_padding_equals_one_prompt_at_a_time(two_adapters, tiny_model_dir):
    model, tokenizer, _ = load_for_inference(str(tiny_model_dir), {"qv": two_adapters["qv"][0]})
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=6)
    assert batched == [generate(model, tokenizer, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert all(batched), "empty completions would make the comparison pass"
    assert tokenizer.padding_side == "right"  # restored for training


def test_generate_command_uses_the_adapter_asked_for(two_adapters, tiny_model_dir):
    args = ["generate", "--model", tiny_model_dir, "--max-new-tokens", 4]
    args += ["--adapter", f"qv={two_adapters['qv'][0]}", "--adapter", f"dora={two_adapters['dora'][0]}", "--use", "dora"]
    result = invoke(*args, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1])
    assert result.exit_code == 0, result.output
    model, tokenizer, pm = load_for_inference(str(tiny_model_dir), {"dora": two_adapters["dora"][0]})
    expected = generate(model, tokenizer, PROMPTS[:2], max_new_tokens=4)
    first, _, _ = load_for_inference(str(tiny_model_dir), {"qv": two_adapters["qv"][0]})
    assert generate(first, tokenizer, PROMPTS[:2], max_new_tokens=4) != expected, "the adapters must answer differently"
    assert result.stdout == "".join(f">>> {p}\n{c}\n\n" for p, c in zip(PROMPTS, expected))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--adapter", "no-equals-sign"], "'no-equals-sign': expected NAME=DIR"),
        (["--adapter", "a=x", "--adapter", "a=y"], "'a' is given twice"),
        (["--use", "missing"], "'missing' is not one of the loaded adapters (none)"),
    ],
)
def test_generate_command_rejects_bad_adapter_arguments(args, message, tiny_model_dir):
    result = invoke("generate", "--model", tiny_model_dir, "--prompt", "hi", *args)
    assert result.exit_code == 2 and message in flat(result.output)
