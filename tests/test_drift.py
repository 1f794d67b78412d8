"""The forgetting check (``--plugin drift``): KL to the base model on general prompts, perplexity
on a general text, the warning, the bundled general set and its errors."""

import copy
import json
import math
import shutil
import subprocess
import sys
import warnings
import zipfile
from fnmatch import fnmatch
from importlib import resources
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from ftengine.build import build, configure
from ftengine.cli import cli
from ftengine.errors import ConfigError
from ftengine.loop import train
from ftengine.modeling import eval_mode
from ftengine.plugins import drift
from ftengine.state import Datasets, RunState
from ftengine.testing import sft_rows, tiny_model, write_jsonl

ROOT = Path(__file__).parent.parent
# Short answers and a small chunk length keep every test quick on the tiny model; the text
# still spans several chunks (the bundled text is about 4,000 byte-level tokens).
DRIFT = {"max_new_tokens": 6, "batch_size": 8}
QUIET = {"warn_kl": 1e9}  # tests of other things perturb far past the default threshold
MAX_LENGTH = 1024


def setup(model_dir, tmp_path, plugins, **options):
    """``(model, tokenizer, state)`` of a run on CPU about to train, with ``drift`` active."""
    data = write_jsonl(tmp_path / "train.jsonl", sft_rows(8))
    base = {
        "model": str(model_dir),
        "output_dir": str(tmp_path / "out"),
        "data": {"train": str(data)},
        "train": {"device": "cpu", "max_length": MAX_LENGTH},
        "drift": {**DRIFT, **QUIET, **options},
    }
    config, pm = configure(plugins=[*plugins, "drift"], base=base)
    model, tokenizer, info = build(config, pm)
    state = RunState(
        config=config, pm=pm, output_dir=tmp_path / "out", device=torch.device("cpu"), adapter_name=info["adapter_name"]
    )
    return model, tokenizer, state


def evaluate(model, tokenizer, state):
    """The plugin's metrics, called as the loop calls them (eval mode, no grad)."""
    with eval_mode(model), torch.no_grad():
        return drift.ftengine_eval_metrics(model=model, tokenizer=tokenizer, datasets=NO_DATA, state=state)


NO_DATA = Datasets(train=[], eval=[], collate=list)


def test_drift_is_computed_once_per_evaluation_not_per_eval_set(tiny_model_dir, tiny_data, tmp_path):
    train_file, eval_file = tiny_data
    overrides = [
        f"model={tiny_model_dir}",
        f"data.train={train_file}",
        f"data.eval={eval_file}",
        f"data.eval_sets={{again: {eval_file}}}",
        f"output_dir={tmp_path / 'out'}",
        "train.max_steps=1",
        "train.batch_size=4",
        *(f"drift.{key}={value}" for key, value in {**DRIFT, **QUIET}.items()),
    ]
    config, pm = configure(None, ["lora", "drift"], overrides)
    final = train(config, pm)["after"]
    assert "eval_drift_kl" in final and "eval_drift_ppl" in final
    assert not [key for key in final if key.startswith("eval_again_drift")]
    assert "eval_again_loss" in final


def reference_kl(base, tuned, batches):
    """Mean per-token KL(base || tuned) over the labelled tokens of ``batches``, from two models."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            labels = batch["labels"][:, 1:]
            mask = labels != -100
            p = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask].log_softmax(-1)
            q = tuned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask].log_softmax(-1)
            total += float((p.exp() * (p - q)).sum())
            count += int(mask.sum())
    return total / count


def perturb(parameters, scale=0.3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in parameters:
            param.add_(scale * torch.randn(param.shape, generator=generator))


def lora_parameters(model):
    return [p for n, p in model.named_parameters() if "lora_B" in n]


# --------------------------------------------------------------------------------------------
# KL against the base
# --------------------------------------------------------------------------------------------


def test_an_untouched_lora_adapter_has_no_drift(tiny_model_dir, tmp_path):
    model, tokenizer, state = setup(tiny_model_dir, tmp_path, ["lora"])
    metrics = evaluate(model, tokenizer, state)
    assert set(metrics) == {"drift_kl", "drift_ppl", "drift_ppl_base"}
    assert abs(metrics["drift_kl"]) < 1e-6
    assert metrics["drift_ppl"] == pytest.approx(metrics["drift_ppl_base"], rel=1e-6)
    assert state.plugin_data["drift"].answer_tokens > 24  # every prompt's answer, its end-of-turn included


def test_a_perturbed_lora_adapter_drifts_and_the_base_is_the_adapters_off_model(tiny_model_dir, tmp_path):
    model, tokenizer, state = setup(tiny_model_dir, tmp_path, ["lora"])
    perturb(lora_parameters(model))  # before the first call: the base answers must still be the base's
    metrics = evaluate(model, tokenizer, state)
    base = tiny_model()
    found = state.plugin_data["drift"]
    prompts = drift.read_prompts(state.config.drift)
    assert found.answers == drift.greedy_answers(base, tokenizer, prompts, state.config.drift)
    assert metrics["drift_kl"] > 1e-3
    assert metrics["drift_kl"] == pytest.approx(reference_kl(base, model, found.batches), abs=1e-5)
    assert metrics["drift_ppl_base"] == pytest.approx(drift.perplexity(base, found.text_batches, state.device), rel=1e-6)
    # The trained adapter is active again afterwards.
    assert all(layer.active_adapter == "default" for layer in model.modules() if hasattr(layer, "lora_A"))
    assert evaluate(model, tokenizer, state) == metrics  # deterministic


def test_full_finetuning_compares_with_the_base_cached_before_the_first_step(tiny_model_dir, tmp_path):
    model, tokenizer, state = setup(tiny_model_dir, tmp_path, ["full"])
    original = copy.deepcopy(model)
    drift.ftengine_on_train_start(model=model, tokenizer=tokenizer, state=state)
    found = state.plugin_data["drift"]
    assert found.cache_bytes == found.answer_tokens * 259 * 4  # float32, answer tokens x vocabulary
    perturb(list(model.parameters())[:4], scale=0.05)  # "training"
    state.step = 5
    metrics = evaluate(model, tokenizer, state)
    assert metrics["drift_kl"] > 1e-3
    assert metrics["drift_kl"] == pytest.approx(reference_kl(original, model, found.batches), abs=1e-5)
    assert metrics["drift_ppl_base"] == pytest.approx(drift.perplexity(original, found.text_batches, state.device), rel=1e-6)
    assert metrics["drift_ppl"] != pytest.approx(metrics["drift_ppl_base"])


def test_full_finetuning_resumed_past_step_0_reports_no_kl(tiny_model_dir, tmp_path):
    model, tokenizer, state = setup(tiny_model_dir, tmp_path, ["full"])
    state.step = 3
    with pytest.warns(drift.DriftWarning, match="starts at step 3, so the base model is gone"):
        drift.ftengine_on_train_start(model=model, tokenizer=tokenizer, state=state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not at every evaluation
        metrics = evaluate(model, tokenizer, state)
    assert set(metrics) == {"drift_ppl"}


def test_prompt_tuning_base_is_the_model_without_virtual_tokens(tiny_model_dir, tmp_path):
    model, tokenizer, state = setup(tiny_model_dir, tmp_path, ["prompt_tuning"])
    metrics = evaluate(model, tokenizer, state)
    base, found = tiny_model(), state.plugin_data["drift"]
    assert metrics["drift_kl"] > 1e-3  # the virtual tokens change every answer from the start
    assert metrics["drift_kl"] == pytest.approx(reference_kl(base, model, found.batches), abs=1e-5)
    assert metrics["drift_ppl_base"] == pytest.approx(drift.perplexity(base, found.text_batches, state.device), rel=1e-6)
    assert model.active_adapter == "default"


# --------------------------------------------------------------------------------------------
# perplexity and the warning
# --------------------------------------------------------------------------------------------


def test_perplexity_is_exp_of_the_mean_token_nll_over_the_text(tiny_model_dir, tmp_path):
    model, tokenizer, state = setup(tiny_model_dir, tmp_path, ["lora"])
    perturb(lora_parameters(model))
    metrics = evaluate(model, tokenizer, state)
    ids = tokenizer(drift.read_text(state.config.drift), add_special_tokens=False)["input_ids"]
    assert len(ids) > 2 * MAX_LENGTH  # several chunks, the last one shorter
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), MAX_LENGTH):
            chunk = torch.tensor([ids[start : start + MAX_LENGTH]])
            logits = model(input_ids=chunk).logits[0, :-1]
            nll += float(F.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
            count += chunk.shape[1] - 1
    assert metrics["drift_ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_the_warning_fires_above_the_threshold_only(tiny_model_dir, tmp_path):
    model, tokenizer, state = setup(tiny_model_dir, tmp_path, ["lora"])
    perturb(lora_parameters(model))
    kl = evaluate(model, tokenizer, state)["drift_kl"]
    state.config.drift.warn_kl = kl * 0.99
    with pytest.warns(drift.DriftWarning) as caught:
        evaluate(model, tokenizer, state)
    message = str(caught[0].message)
    assert f"eval_drift_kl={kl:.4g}" in message and f"drift.warn_kl={kl * 0.99:g}" in message
    assert "moved far from the base model's (forgetting); lower train.lr or the number of steps" in message
    state.config.drift.warn_kl = kl * 1.01
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(model, tokenizer, state)


# --------------------------------------------------------------------------------------------
# the general set: bad files, and the wheel
# --------------------------------------------------------------------------------------------


def config_problems(tmp_path, **options):
    data = write_jsonl(tmp_path / "train.jsonl", sft_rows(4))
    base = {"model": str(tmp_path / "no-model-here"), "data": {"train": str(data)}, "drift": options}
    with pytest.raises(ConfigError) as caught:
        configure(plugins=["lora", "drift"], base=base)
    return str(caught.value)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "general.jsonl: holds no prompts"),
        ("\n  \n", "general.jsonl: holds no prompts"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n', "general.jsonl:2: not valid JSON"),
        ('{"prompt": "hi"}\n', "general.jsonl:1: expected a chat row"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
            "general.jsonl:1: the chat ends",
        ),
        ('{"messages": [{"role": "usr", "content": "a"}]}\n', "general.jsonl:1: messages[0].role is 'usr'"),
    ],
)
def test_a_bad_prompts_file_is_a_config_error_before_any_model_loads(tmp_path, content, expected):
    # The model path does not exist: the error comes before anything would load it.
    prompts = tmp_path / "general.jsonl"
    prompts.write_text(content)
    message = config_problems(tmp_path, prompts=str(prompts))
    assert f"drift.prompts: {prompts.parent}/{expected}" in message


def test_an_empty_or_missing_text_file_is_a_config_error(tmp_path):
    (tmp_path / "empty.txt").write_text(" \n")
    message = config_problems(tmp_path, text=str(tmp_path / "empty.txt"), prompts=str(tmp_path / "missing.jsonl"))
    assert f"drift.text: {tmp_path}/empty.txt: holds no text" in message
    assert f"drift.prompts: {tmp_path}/missing.jsonl: cannot read drift.prompts (No such file or directory)" in message


def test_a_run_with_an_empty_general_set_writes_nothing(run_overrides, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    options = [arg for o in [*run_overrides, f"drift.prompts={tmp_path / 'empty.jsonl'}"] for arg in ("-o", o)]
    result = CliRunner().invoke(cli, ["run", "--plugin", "lora", "--plugin", "drift", *options], catch_exceptions=False)
    assert result.exit_code == 2
    assert f"drift.prompts: {tmp_path}/empty.jsonl: holds no prompts" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_the_bundled_general_set_is_well_formed():
    options = drift.DriftOptions()
    prompts = drift.read_prompts(options)
    assert len(prompts) == 24 and all(len(m) == 1 and m[0]["role"] == "user" for m in prompts)
    assert len({m[0]["content"] for m in prompts}) == 24
    assert 600 <= len(drift.read_text(options).split()) <= 900


def test_the_general_set_ships_in_the_wheel(tmp_path):
    import tomllib  # Python 3.11+, as in test_docs

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["ftengine.plugins.drift"]
    for name in (drift.BUNDLED_PROMPTS, drift.BUNDLED_TEXT):
        assert any(fnmatch(name, g) for g in globs), name
        assert resources.files("ftengine.plugins.drift").joinpath(name).is_file()
    # A wheel built from a copy of the sources holds them (an editable install finds any file).
    pytest.importorskip("setuptools")
    source = tmp_path / "src"
    source.mkdir()
    for item in ("pyproject.toml", "README.md", "core", "plugins"):
        copy_item = shutil.copytree if (ROOT / item).is_dir() else shutil.copy
        copy_item(
            ROOT / item, source / item, **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / item).is_dir() else {})
        )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("ftengine-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in (drift.BUNDLED_PROMPTS, drift.BUNDLED_TEXT):
        assert f"ftengine/plugins/drift/{name}" in names


# --------------------------------------------------------------------------------------------
# a whole run
# --------------------------------------------------------------------------------------------


def metrics_records(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("method", "eval_before"), [("lora", True), ("full", False)])
def test_a_run_with_drift_logs_it_and_trains_as_without(run_overrides, tmp_path, method, eval_before):
    options = [f"drift.{k}={v}" for k, v in DRIFT.items()] + ["drift.warn_kl=1e9"]
    config, pm = configure(None, [method, "drift"], run_overrides + options)
    train(config, pm, eval_before=eval_before)
    records = metrics_records(tmp_path / "out")
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == ([0, 4] if eval_before else [4])
    assert all({"eval_drift_kl", "eval_drift_ppl", "eval_drift_ppl_base"} <= set(r) for r in evals)
    if eval_before:
        assert abs(evals[0]["eval_drift_kl"]) < 1e-6
    # full, without --eval-before: the base was kept when training started.
    assert evals[-1]["eval_drift_kl"] > 0
    # The check draws no random numbers: training is the same without it.
    config, pm = configure(None, [method], run_overrides + [f"output_dir={tmp_path / 'plain'}"])
    train(config, pm, eval_before=eval_before)
    plain = metrics_records(tmp_path / "plain")
    assert [r["loss"] for r in plain if "loss" in r] == [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize(("method", "parallel"), [("lora", "ddp"), ("full", "fsdp")])
def test_two_processes_report_the_drift_of_one(tmp_path, method, parallel):
    """Every rank runs the check over the whole set, in step (FSDP's forwards need every rank):
    the values logged are those of one process."""
    from test_distributed import launch, one_process, overrides, save_tiny_model

    save_tiny_model(tmp_path / "model")
    write_jsonl(tmp_path / "train.jsonl", sft_rows(9, seed=0))
    write_jsonl(tmp_path / "eval.jsonl", sft_rows(3, seed=1))
    opts = [f"drift.{k}={v}" for k, v in {**DRIFT, **QUIET}.items()] + ["train.lr=1e-2"]
    opts += ["lora.dropout=0"] if method == "lora" else []  # each rank draws its own dropout masks
    one_process([method, "drift"], overrides(tmp_path, tmp_path / "one", *opts))
    launch([method, "drift", parallel], overrides(tmp_path, tmp_path / "two", *opts))
    one, two = (metrics_records(tmp_path / name)[-1] for name in ("one", "two"))
    assert one["eval_drift_kl"] > 0
    for key in ("eval_drift_kl", "eval_drift_ppl", "eval_drift_ppl_base"):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key
