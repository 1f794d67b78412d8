"""A third-party adapter method, (IA)³, published as a package (``tests/ia3_plugin``), works
through ftengine with no ftengine change: train, save in PEFT's format, load, generate, merge.

``make install`` installs the package (``pip install -e tests/ia3_plugin``); a checkout without
it skips these tests with the install command in the reason.
"""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from ftengine.adapter_contract import AdapterContract
from ftengine.build import build, configure
from ftengine.cli import cli
from ftengine.errors import AdapterError, ConfigError
from ftengine.inference import load_for_inference, set_adapter
from ftengine.loop import save, train
from ftengine.methods import adapter_methods
from ftengine.pluginmanager import active_names
from ftengine.testing import greedy_without_cache, sft_rows, tiny_model, tiny_tokenizer, write_jsonl
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

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


# --------------------------------------------------------------------------------------------
# the plugin through ftengine: train, save, PEFT both ways, generate, inference API, merge
# --------------------------------------------------------------------------------------------

CASES = {
    "k-v-down": {"target_modules": TARGETS, "feedforward_modules": FEEDFORWARD},
    "regex": {"target_modules": r".*\.(q_proj|up_proj|down_proj)", "feedforward_modules": r".*\.down_proj"},
    "all-linear": {"target_modules": "all-linear", "feedforward_modules": ["down_proj", "o_proj"]},
}


def peft_model_of(adapter_dir):
    return peft.PeftModel.from_pretrained(tiny_model(), adapter_dir).eval()


def ftengine_adapter(model_dir, tmp_path, ia3):
    """An ftengine (IA)³ adapter with every vector moved from ones, saved; and its logits."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    base = {
        "model": str(model_dir),
        "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", sft_rows(2)))},
        "train": {"device": "cpu"},
        "ia3": ia3,
    }
    config, pm = configure(plugins=["ia3"], base=base)
    model, tokenizer, _ = build(config, pm)
    perturb_vectors(model.named_parameters())
    return save(model.eval(), tokenizer, config, pm, tmp_path / "adapter"), logits(model)


def peft_adapter(tmp_path, ia3, seed=3):
    """A PEFT IA3 adapter with every vector moved from ones, saved; and its logits."""
    config = peft.IA3Config(task_type="CAUSAL_LM", **ia3)
    model = peft.get_peft_model(tiny_model(), config)
    perturb_vectors(model.named_parameters(), seed)
    path = tmp_path / f"peft-adapter-{seed}"
    model.save_pretrained(path)
    return path, logits(model.eval())


@pytest.fixture
def trained_run(run_overrides):
    """A short (IA)³ training run through the CLI: its output directory."""
    overrides = [*run_overrides, "train.max_steps=8", "train.lr=1e-1"]
    result = CliRunner().invoke(cli, ["run", "--plugin", "ia3", "--eval-before", *(a for o in overrides for a in ("-o", o))])
    assert result.exit_code == 0, result.output
    return Path(next(o for o in run_overrides if o.startswith("output_dir=")).partition("=")[2])


def test_trains_with_plugin_from_the_command_line_and_the_loss_drops(trained_run):
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    before, after = (r["eval_loss"] for r in records if "eval_loss" in r)
    # From worse than a uniform guess over the 259-token vocabulary to better than it (measured:
    # 6.31 -> 4.98); scaling 96 activations per layer by learned vectors is enough for that.
    assert before > math.log(259) > after, (before, after)
    with safe_open(trained_run / "final" / "adapter_model.safetensors", "pt") as handle:
        assert all(key.endswith(".ia3_l") for key in handle.keys())
        moved = [key for key in handle.keys() if not torch.equal(handle.get_tensor(key), torch.ones(1))]
    assert moved, "training must move the vectors from ones"


@pytest.mark.parametrize("case", CASES)
def test_ftengine_adapter_loads_in_peft_with_the_same_logits(case, tiny_model_dir, tmp_path):
    path, expected = ftengine_adapter(tiny_model_dir, tmp_path, CASES[case])
    assert (expected - logits(tiny_model())).abs().max() > 1e-2
    torch.testing.assert_close(logits(peft_model_of(path)), expected, atol=ATOL, rtol=0)


def test_adapter_config_has_the_fields_peft_writes(tiny_model_dir, tmp_path):
    ours, _ = ftengine_adapter(tiny_model_dir, tmp_path, {"target_modules": "all-linear"})
    peft_model_of(ours).save_pretrained(tmp_path / "resaved")
    written, resaved = (json.loads((d / "adapter_config.json").read_text()) for d in (ours, tmp_path / "resaved"))
    assert set(resaved) - set(written) == {"peft_version"}  # the writer's version: PEFT's own
    for key in ("target_modules", "feedforward_modules"):  # PEFT keeps them as sets
        assert sorted(written.pop(key)) == sorted(resaved.pop(key)), key
    assert written == {k: v for k, v in resaved.items() if k != "peft_version"}
    assert sorted(json.loads((ours / "adapter_config.json").read_text())["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_in_ftengine_with_the_same_logits(case, tiny_model_dir, tmp_path):
    path, expected = peft_adapter(tmp_path, CASES[case])
    model, _, pm = load_for_inference(str(tiny_model_dir), {"peft": path})
    assert "ia3" in active_names(pm), "the core must find the plugin from the adapter's peft_type"
    torch.testing.assert_close(logits(model), expected, atol=ATOL, rtol=0)


def test_inference_api_swaps_adapters_and_turns_them_off(tiny_model_dir, tmp_path):
    path_a, expected_a = peft_adapter(tmp_path, CASES["k-v-down"], seed=3)
    path_b, expected_b = peft_adapter(tmp_path, CASES["k-v-down"], seed=4)
    model, _, pm = load_for_inference(str(tiny_model_dir), {"a": path_a, "b": path_b})
    torch.testing.assert_close(logits(model), expected_a, atol=ATOL, rtol=0)
    set_adapter(model, pm, "b")
    torch.testing.assert_close(logits(model), expected_b, atol=ATOL, rtol=0)
    set_adapter(model, pm, None)
    torch.testing.assert_close(logits(model), logits(tiny_model()), atol=ATOL, rtol=0)


def test_adapters_of_two_methods_load_side_by_side(tiny_model_dir, tmp_path):
    lora = peft.get_peft_model(tiny_model(), peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    path, expected = peft_adapter(tmp_path, CASES["k-v-down"])
    model, _, pm = load_for_inference(str(tiny_model_dir), {"lora": tmp_path / "lora", "ia3": path})
    set_adapter(model, pm, "ia3")
    torch.testing.assert_close(logits(model), expected, atol=ATOL, rtol=0)


def reference_completion(model, tokenizer, prompt, max_new_tokens):
    """Greedy decoding by full forward passes (no KV cache) of the chat-rendered ``prompt``, up to
    the end-of-sequence token: a reference no library's cached ``generate`` can move."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    new = greedy_without_cache(model, ids, max_new_tokens)[0, ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True)


def test_generate_command_uses_the_adapter(tiny_model_dir, tmp_path):
    path, _ = peft_adapter(tmp_path, CASES["k-v-down"])
    tokenizer = tiny_tokenizer()
    expected = reference_completion(peft_model_of(path), tokenizer, "Reverse: alpha", 8)
    base = reference_completion(tiny_model(), tokenizer, "Reverse: alpha", 8)
    assert expected != base, "the adapter must change the completion for this test to mean anything"
    result = CliRunner().invoke(
        cli,
        [
            "generate",
            "--model",
            str(tiny_model_dir),
            "--adapter",
            f"a={path}",
            "--prompt",
            "Reverse: alpha",
            "--max-new-tokens",
            "8",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == f">>> Reverse: alpha\n{expected}\n\n"


def test_merge_command_writes_a_plain_model_with_the_adapter_logits(trained_run, tiny_model_dir, tmp_path):
    adapter = trained_run / "final"
    expected = logits(peft_model_of(adapter))
    out = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["merge", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--out", str(out)])
    assert result.exit_code == 0, result.output
    with safe_open(out / "model.safetensors", "pt") as handle:
        assert not [k for k in handle.keys() if "ia3" in k or "base_layer" in k]
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (expected - logits(tiny_model())).abs().max() > 1e-3
    torch.testing.assert_close(logits(merged), expected, atol=ATOL, rtol=0)


def test_dpo_trains_the_adapter_against_the_model_with_adapters_off(tiny_model_dir, tmp_path):
    """DPO names no method: it finds the adapter through ``AdapterMethod.adapter_name`` and takes its
    reference with the adapters off (``activate(None)``)."""
    rows = [
        {"prompt": f"Reverse: {w}", "chosen": w[::-1], "rejected": w}
        for w in ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    ]
    prefs = write_jsonl(tmp_path / "prefs.jsonl", rows)
    overrides = [f"model={tiny_model_dir}", f"data.train={prefs}", f"data.eval={prefs}", f"output_dir={tmp_path / 'out'}"]
    config, pm = configure(None, ["ia3", "dpo"], [*overrides, "train.batch_size=8", "train.max_steps=20", "train.lr=1e-1"])
    assert adapter_methods(pm).adapter_name(config) == "default"
    summary = train(config, pm, eval_before=True)
    before, after = summary["before"], summary["after"]
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at init
    # measured: loss 0.693 -> 0.218, margin 0 -> 1.42, every pair ranked right
    assert after["eval_loss"] < 0.4 and after["eval_reward_margin"] > 1.0 and after["eval_reward_accuracy"] == 1.0


# --------------------------------------------------------------------------------------------
# bad adapters: clear errors, the model left as it was
# --------------------------------------------------------------------------------------------


def test_a_second_adapter_under_a_loaded_name_is_refused(tiny_model_dir, tmp_path):
    path, expected = peft_adapter(tmp_path, CASES["k-v-down"])
    model, _, pm = load_for_inference(str(tiny_model_dir), {"a": path})
    for name, message in (("a", "an adapter named 'a' is already loaded"), ("a.b", "must be non-empty and without dots")):
        with pytest.raises(AdapterError, match=re.escape(f"{path}: ") + r".*" + re.escape(message)):
            adapter_methods(pm).load(model, path, name, None)
    torch.testing.assert_close(logits(model), expected, atol=ATOL, rtol=0)


def test_an_adapter_that_does_not_fit_leaves_the_model_unchanged(tiny_model_dir, tmp_path):
    path, expected = peft_adapter(tmp_path, CASES["k-v-down"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    with safe_open(path / "adapter_model.safetensors", "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    key = next(k for k in tensors if "down_proj" in k)
    tensors[key] = tensors[key].T.contiguous()  # a [64, 1] output vector where the input needs [1, 64]
    save_file(tensors, bad / "adapter_model.safetensors", metadata={"format": "pt"})
    model, _, pm = load_for_inference(str(tiny_model_dir), {"a": path})
    with pytest.raises(AdapterError, match=r"down_proj\.ia3_l' has shape \[64, 1\] but the base model needs \[1, 64\]"):
        adapter_methods(pm).load(model, bad, "b", None)
    assert all(set(layer.ia3_l) == {"a"} for _, layer in ia3_layers(model))
    torch.testing.assert_close(logits(model), expected, atol=ATOL, rtol=0)


def test_unsupported_peft_options_are_refused_by_name(tiny_model_dir, tmp_path):
    path, _ = peft_adapter(tmp_path, CASES["k-v-down"])
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    with pytest.raises(AdapterError, match="'modules_to_save': \\['lm_head'\\] is a PEFT option the ia3 plugin does not support"):
        load_for_inference(str(tiny_model_dir), {"a": path})


def test_config_problems_are_reported_together(run_overrides):
    with pytest.raises(ConfigError) as error:
        configure(None, ["ia3"], [*run_overrides, "ia3.adapter_name=a.b", "ia3.target_modules=[k_proj]"])
    assert [p.split(":")[0] for p in error.value.problems] == ["ia3.adapter_name", "ia3.feedforward_modules"]


# --------------------------------------------------------------------------------------------
# the shared adapter contract
# --------------------------------------------------------------------------------------------


class TestIA3Contract(AdapterContract):
    plugins = ["ia3"]
