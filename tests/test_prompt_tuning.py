"""Prompt tuning: the adapter contract, PEFT's PROMPT_TUNING format both ways, initialisation,
generation with the KV cache, a 4-bit base, and a short training run."""

import json
from types import SimpleNamespace

import pytest
import torch
from ftengine.adapter_contract import AdapterContract
from ftengine.build import build, configure
from ftengine.errors import AdapterError, ConfigError, PluginError
from ftengine.inference import load_for_inference, set_adapter
from ftengine.loop import save, train
from ftengine.methods import adapter_methods
from ftengine.plugins.prompt_tuning import PromptTuningModel
from ftengine.testing import greedy_without_cache, sft_rows, tiny_model, write_jsonl
from safetensors import safe_open
from safetensors.torch import save_file

VIRTUAL = 4


class TestPromptTuningContract(AdapterContract):
    plugins = ["prompt_tuning"]
    overrides = {"prompt_tuning": {"num_virtual_tokens": VIRTUAL}}
    supports_merge = False

    def test_output_at_initialisation_equals_base(self, run, base_logits):
        pytest.skip(
            "prompt tuning: the virtual tokens change the output from the first step; see test_disabled_at_initialisation_equals_base"
        )

    def test_disabled_at_initialisation_equals_base(self, run, base_logits):
        adapter_methods(run.pm).activate(run.model, None)
        torch.testing.assert_close(self.logits(run.model), base_logits, atol=self.atol, rtol=0)


def build_run(model_dir, tmp_path, plugins=("prompt_tuning",), **options):
    overrides = [
        f"model={model_dir}",
        f"data.train={write_jsonl(tmp_path / 'train.jsonl', sft_rows(8))}",
        f"output_dir={tmp_path / 'out'}",
    ]
    overrides += [f"prompt_tuning.{k}={v}" for k, v in {"num_virtual_tokens": VIRTUAL, **options}.items()]
    config, pm = configure(None, list(plugins), overrides)
    model, tokenizer, info = build(config, pm)
    return SimpleNamespace(model=model.eval(), tokenizer=tokenizer, info=info, config=config, pm=pm)


def real_token_logits(model, inputs):
    """Logits of the real tokens: a PEFT prompt-tuning model also returns the virtual positions."""
    with torch.no_grad():
        logits = model(**inputs).logits
    return logits[:, -inputs["input_ids"].shape[1] :]


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


def test_text_init_without_text_is_a_config_error(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="prompt_tuning.init_text"):
        build_run(tiny_model_dir, tmp_path, init="text")


def test_init_text_without_text_init_is_a_config_error(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="only used with init: text"):
        build_run(tiny_model_dir, tmp_path, init_text="hello")


@pytest.mark.parametrize("other", ["full", "lora"])
def test_conflicts_with_full_and_lora(tiny_model_dir, tmp_path, other):
    first, second = sorted(("prompt_tuning", other))
    with pytest.raises(PluginError, match=f"plugins '{first}' and '{second}' conflict: select only one of them"):
        build_run(tiny_model_dir, tmp_path, plugins=("prompt_tuning", other))


# --------------------------------------------------------------------------------------------
# initialisation
# --------------------------------------------------------------------------------------------


def test_text_init_equals_peft(tiny_model_dir, tmp_path):
    from peft import PromptTuningConfig, get_peft_model

    text = "Reverse the word"  # 16 byte tokens: cut to VIRTUAL; "ab" below is repeated
    for init_text in (text, "ab"):
        ours = build_run(tiny_model_dir, tmp_path, init="text", init_text=init_text)
        peft_config = PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=VIRTUAL,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=init_text,
            tokenizer_name_or_path=str(tiny_model_dir),
        )
        theirs = get_peft_model(tiny_model(), peft_config)
        expected = theirs.prompt_encoder["default"].embedding.weight
        torch.testing.assert_close(ours.model.prompt_embeddings["default"], expected, rtol=0, atol=0)


def test_sample_vocab_init_takes_rows_of_the_embedding_matrix(tiny_model_dir, tmp_path):
    run = build_run(tiny_model_dir, tmp_path, init="sample_vocab")
    vocabulary = run.model.get_input_embeddings().weight
    for row in run.model.prompt_embeddings["default"]:
        assert (vocabulary == row).all(dim=1).any()


def test_random_init_has_the_scale_of_the_embeddings(tiny_model_dir, tmp_path):
    run = build_run(tiny_model_dir, tmp_path, num_virtual_tokens=64)
    with torch.no_grad():
        ratio = run.model.prompt_embeddings["default"].std() / run.model.get_input_embeddings().weight.std()
    assert 0.8 < float(ratio) < 1.2


# --------------------------------------------------------------------------------------------
# the wrapper
# --------------------------------------------------------------------------------------------


def test_logits_are_those_of_the_real_tokens_after_the_prompt(tiny_model_dir, tmp_path):
    run = build_run(tiny_model_dir, tmp_path)
    inputs = AdapterContract.inputs()
    with torch.no_grad():
        logits = run.model(**inputs).logits
        base = run.model.get_base_model()
        prompt = run.model.prompt_embeddings["default"].expand(2, -1, -1)
        embeds = torch.cat([prompt, base.get_input_embeddings()(inputs["input_ids"])], dim=1)
        expected = base(inputs_embeds=embeds).logits[:, VIRTUAL:]
    assert logits.shape[:2] == inputs["input_ids"].shape
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_generate_with_cache_and_left_padding_equals_greedy_forward(tiny_model_dir, tmp_path):
    run = build_run(tiny_model_dir, tmp_path)
    model, new = run.model, 5
    rows = [[5, 6, 7, 8, 9], [10, 11, 12]]
    ids = torch.tensor([[5, 6, 7, 8, 9], [256, 256, 10, 11, 12]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        batched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=256)
        assert torch.equal(batched[:, : ids.shape[1]], ids)
    for row, generated in zip(rows, batched):
        expected = greedy_without_cache(model, torch.tensor([row]), new)  # no cache, no padding
        assert generated[-new:].tolist() == expected[0, -new:].tolist()


def test_runs_over_a_4bit_base():
    pytest.importorskip("bitsandbytes")
    from ftengine.plugins import qlora

    base = tiny_model(hidden_size=64)
    qlora.ftengine_quantize_model(base, SimpleNamespace(qlora=qlora.QloraOptions()))
    base.requires_grad_(False)
    model = PromptTuningModel(base)
    model.add_prompt("default", 0.2 * torch.randn(VIRTUAL, 64), {})
    inputs = AdapterContract.inputs()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert model.prompt_embeddings["default"].grad.abs().sum() > 0
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 3)


# --------------------------------------------------------------------------------------------
# PEFT format, both ways
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_adapter(tiny_model_dir, tmp_path_factory):
    """A PEFT prompt-tuning adapter of the tiny model, moved away from its initial values."""
    from peft import PromptTuningConfig, get_peft_model

    torch.manual_seed(3)
    model = get_peft_model(
        tiny_model(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL, prompt_tuning_init="SAMPLE_VOCAB")
    )
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.add_(0.1 * torch.randn(VIRTUAL, 32))
    path = tmp_path_factory.mktemp("peft-prompt")
    model.save_pretrained(path)
    return path, model


def test_files_have_peft_layout(tiny_model_dir, tmp_path, peft_adapter):
    run = build_run(tiny_model_dir, tmp_path, init="text", init_text="hi")
    saved = save(run.model, run.tokenizer, run.config, run.pm, tmp_path / "saved")
    ours = json.loads((saved / "adapter_config.json").read_text())
    peft = json.loads((peft_adapter[0] / "adapter_config.json").read_text())
    assert set(ours) == set(peft) - {"peft_version"}
    assert ours["peft_type"] == "PROMPT_TUNING" and ours["task_type"] == "CAUSAL_LM"
    assert (ours["num_virtual_tokens"], ours["token_dim"], ours["num_transformer_submodules"]) == (VIRTUAL, 32, 1)
    assert (ours["prompt_tuning_init"], ours["prompt_tuning_init_text"]) == ("TEXT", "hi")
    assert ours["tokenizer_name_or_path"] == ours["base_model_name_or_path"] == str(tiny_model_dir)
    with safe_open(saved / "adapter_model.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        assert list(handle.keys()) == ["prompt_embeddings"]
        assert handle.get_tensor("prompt_embeddings").shape == (VIRTUAL, 32)


@pytest.fixture
def ours_in_peft(tiny_model_dir, tmp_path):
    """``(run, theirs)``: a trained-looking prompt of ours, and PEFT's model loading it."""
    from peft import PeftModel

    run = build_run(tiny_model_dir, tmp_path, init="text", init_text="Reverse")
    AdapterContract.perturb(run.model, run.info["trainable"])
    saved = save(run.model, run.tokenizer, run.config, run.pm, tmp_path / "saved")
    return run, PeftModel.from_pretrained(tiny_model(), saved).eval()


def test_peft_loads_ours_with_identical_logits(ours_in_peft):
    run, theirs = ours_in_peft
    inputs = AdapterContract.inputs()
    torch.testing.assert_close(real_token_logits(theirs, inputs), real_token_logits(run.model, inputs), rtol=0, atol=1e-6)
    with torch.no_grad():
        # Labels too: the virtual positions are ignored, the first real token is scored (as PEFT).
        labelled = {**inputs, "labels": inputs["input_ids"]}
        torch.testing.assert_close(run.model(**labelled).loss, theirs(**labelled).loss, rtol=0, atol=1e-6)
        ours = run.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    # Generation is compared with greedy decoding by full forward passes (no KV cache), for our
    # model and for PEFT's: a reference no library's cache handling can move.
    reference = greedy_without_cache(theirs, inputs["input_ids"], 4)
    assert torch.equal(greedy_without_cache(run.model, inputs["input_ids"], 4), reference)
    assert torch.equal(ours, reference)


@pytest.mark.xfail(
    strict=True,
    reason="known upstream difference (peft 0.21.2, transformers 5.24.0): PEFT's cached generate for "
    "PROMPT_TUNING ignores position ids and diverges from its own no-cache greedy decoding from the "
    "second new token on; this xfail turns into a failure when upstream changes",
)
def test_peft_cached_generate_equals_its_no_cache_greedy_decoding(ours_in_peft):
    _, theirs = ours_in_peft
    inputs = AdapterContract.inputs()
    with torch.no_grad():
        cached = theirs.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(cached, greedy_without_cache(theirs, inputs["input_ids"], 4))


def test_we_load_peft_with_identical_logits(tiny_model_dir, peft_adapter):
    path, theirs = peft_adapter
    model, _, pm = load_for_inference(str(tiny_model_dir), {"peft": path})
    assert isinstance(model, PromptTuningModel) and model.active_adapter == "peft"
    inputs = AdapterContract.inputs()
    torch.testing.assert_close(real_token_logits(model, inputs), real_token_logits(theirs.eval(), inputs), rtol=0, atol=1e-6)
    adapter_methods(pm).activate(model, None)
    torch.testing.assert_close(real_token_logits(model, inputs), real_token_logits(tiny_model(), inputs), rtol=0, atol=1e-6)


def test_a_prompt_of_another_width_is_refused_and_the_model_is_unchanged(tiny_model_dir, tmp_path, peft_adapter):
    config = json.loads((peft_adapter[0] / "adapter_config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({**config, "token_dim": 16}))
    save_file({"prompt_embeddings": torch.zeros(VIRTUAL, 16)}, bad / "adapter_model.safetensors")
    run = build_run(tiny_model_dir, tmp_path)
    with pytest.raises(AdapterError, match="token_dim 16"):
        adapter_methods(run.pm).load(run.model, bad, "bad", run.config)
    assert list(run.model.prompt_embeddings) == ["default"]


def test_merging_a_prompt_is_refused(tiny_model_dir, tmp_path):
    run = build_run(tiny_model_dir, tmp_path)
    with pytest.raises(AdapterError, match="cannot be merged"):
        adapter_methods(run.pm).merge(run.model)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_trains_only_the_prompt(run_overrides, tmp_path):
    overrides = run_overrides + [
        "train.max_steps=12",
        "train.lr=0.05",
        "prompt_tuning.num_virtual_tokens=8",
        "prompt_tuning.init=sample_vocab",
    ]
    config, pm = configure(None, ["prompt_tuning"], overrides)
    summary = train(config, pm, eval_before=True)
    assert summary["build"]["trainable"] == ["prompt_embeddings.default"]
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    assert sorted(p.name for p in summary["saved"].iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "ftengine_base.json",
    ]


def test_activating_an_unknown_prompt_names_the_loaded_ones(tiny_model_dir, tmp_path):
    run = build_run(tiny_model_dir, tmp_path)
    with pytest.raises(AdapterError, match=r"no adapter named 'other' is loaded \(loaded: default\)"):
        set_adapter(run.model, run.pm, "other")
    assert run.model.active_adapter == "default"


def test_logits_to_keep_counts_real_positions(tiny_model_dir, tmp_path):
    run = build_run(tiny_model_dir, tmp_path)
    inputs = AdapterContract.inputs()
    with torch.no_grad():
        full = run.model(**inputs).logits
        positions = torch.tensor([0, 3, 11])
        torch.testing.assert_close(run.model(**inputs, logits_to_keep=positions).logits, full[:, positions])
        torch.testing.assert_close(run.model(**inputs, logits_to_keep=2).logits, full[:, -2:])
