"""Evaluation sets (data.eval_sets), the prompting baselines (eval.baselines) and length grouping."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from ftengine.build import configure
from ftengine.cli import cli
from ftengine.errors import ConfigError, DataError
from ftengine.evaluation import evaluate, evaluate_baselines
from ftengine.loop import epoch_order, prepare, train
from ftengine.state import token_count
from ftengine.testing import KillAfter, write_jsonl
from ftengine_contacts import task


def records(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def contacts_data(tmp_path):
    """Contacts chat rows: train, eval, and a second eval set."""
    rows = [{"messages": e["messages"]} for e in task.generate_examples(18, seed="evaluation")]
    return (
        write_jsonl(tmp_path / "train.jsonl", rows[:12]),
        write_jsonl(tmp_path / "valid.jsonl", rows[12:15]),
        write_jsonl(tmp_path / "other.jsonl", rows[15:]),
    )


@pytest.fixture
def contacts_overrides(tiny_model_dir, contacts_data, tmp_path):
    train_file, valid, _ = contacts_data
    return [
        f"model={tiny_model_dir}",
        f"data.train={train_file}",
        f"data.eval={valid}",
        f"output_dir={tmp_path / 'out'}",
        "train.max_steps=2",
        "train.batch_size=4",
        "train.lr=1e-2",
        "contacts.max_new_tokens=4",
    ]


def test_each_eval_set_is_scored_as_data_eval_would_be(contacts_overrides, contacts_data, tmp_path):
    other = contacts_data[2]
    config, pm = configure(None, ["lora", "contacts"], contacts_overrides + [f"data.eval_sets={{other: {other}}}"])
    train(config, pm)
    final = records(tmp_path / "out")[-1]
    config, pm = configure(
        None, ["lora", "contacts"], contacts_overrides + [f"data.eval={other}", f"output_dir={tmp_path / 'b'}"]
    )
    train(config, pm)
    alone = records(tmp_path / "b")[-1]
    scored = {
        key.removeprefix("eval_"): value for key, value in alone.items() if key.startswith("eval_") and key != "eval_time_s"
    }
    assert {key: final[f"eval_other_{key}"] for key in scored} == pytest.approx(scored, rel=1e-6)
    assert final["eval_loss"] != pytest.approx(final["eval_other_loss"])  # two different sets


def test_an_eval_set_name_must_fit_a_metric_name(contacts_overrides):
    with pytest.raises(ConfigError, match=r"data\.eval_sets\.Held-Out"):
        configure(None, ["lora", "contacts"], contacts_overrides + ["data.eval_sets={Held-Out: x.jsonl}"])


def without_time(record):
    return {key: value for key, value in record.items() if key != "eval_time_s"}


def test_zero_shot_baseline_scores_the_model_with_its_adapters_off(contacts_overrides):
    config, pm = configure(None, ["lora", "contacts"], contacts_overrides + ["eval.baselines=[zero_shot]"])
    run = prepare(config, pm, Path(config.output_dir), resume=False)
    base = evaluate(run.model, run.tokenizer, run.datasets, run.state)  # LoRA starts as the identity
    with torch.no_grad():
        for name, param in run.params.items():
            param.add_(0.5 if "lora_B" in name else 0.0)
    tuned = evaluate(run.model, run.tokenizer, run.datasets, run.state)
    assert tuned["eval_loss"] != pytest.approx(base["eval_loss"], rel=1e-3)
    baselines = evaluate_baselines(run.model, run.tokenizer, run.datasets, run.state)
    assert without_time(baselines["zero_shot"]) == pytest.approx(without_time(base), rel=1e-6)
    # ...and the trained adapter is on again afterwards.
    again = evaluate(run.model, run.tokenizer, run.datasets, run.state)
    assert without_time(again) == pytest.approx(without_time(tuned), rel=1e-6)


def test_few_shot_baseline_puts_k_seeded_training_examples_before_each_prompt(contacts_overrides, contacts_data, tmp_path):
    config, pm = configure(
        None, ["lora", "contacts"], contacts_overrides + ["eval.baselines=[zero_shot, few_shot]", "eval.few_shot_k=2"]
    )
    summary = train(config, pm)
    zero, few = summary["baselines"]["zero_shot"], summary["baselines"]["few_shot"]
    assert few["shots"] == 2 and "eval_loss" not in few and "eval_loss" in zero
    # The prompt tokens: each eval row after the 2 training rows train.seed picks, as chat turns.
    train_rows = [json.loads(line) for line in contacts_data[0].read_text().splitlines()]
    valid_rows = [json.loads(line) for line in contacts_data[1].read_text().splitlines()]
    shots = [train_rows[i]["messages"] for i in torch.randperm(12, generator=torch.Generator().manual_seed(0))[:2].tolist()]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model)

    def mean_tokens(prefix):
        texts = [
            tokenizer.apply_chat_template(prefix + row["messages"][:-1], add_generation_prompt=True, tokenize=False)
            for row in valid_rows
        ]
        return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts) / len(texts)

    assert zero["eval_prompt_tokens"] == mean_tokens([]) != few["eval_prompt_tokens"]
    assert few["eval_prompt_tokens"] == mean_tokens([m for shot in shots for m in shot])
    logged = [r for r in records(tmp_path / "out") if "baseline" in r]
    assert [(r["step"], r["baseline"]) for r in logged] == [(0, "zero_shot"), (0, "few_shot")]


def test_the_table_has_a_column_per_baseline_and_the_run_says_where_its_time_went(contacts_overrides, tmp_path):
    args = ["run", "--plugin", "lora", "--plugin", "contacts", "-o", "eval.baselines=[zero_shot, few_shot]"]
    for override in contacts_overrides:
        args += ["-o", override]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    (header,) = [[cell.strip() for cell in line.split("┃")[1:-1]] for line in lines if line.startswith("┃")]
    assert header == ["metric", "zero-shot", "few-shot (k=3)", "fine-tuned"]
    cells = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]] for line in lines if line.startswith("│")}
    zero, few = (r for r in records(tmp_path / "out") if "baseline" in r)
    final = records(tmp_path / "out")[-1]
    assert cells["loss"] == [f"{zero['eval_loss']:.3f}", "-", f"{final['eval_loss']:.3f}"]
    assert cells["prompt_tokens"] == [f"{r['eval_prompt_tokens']:.3f}" for r in (zero, few, final)]
    (timing,) = [line for line in lines if line.startswith("time: ")]
    assert timing.startswith("time: set-up ") and ", zero-shot " in timing and ", few-shot (k=3) " in timing
    assert ", training " in timing and timing.endswith(f", final evaluation {final['eval_time_s']:.0f} s")


def test_baseline_rows_limits_the_baselines_to_the_first_rows_of_each_set(contacts_overrides, contacts_data, tmp_path):
    other = contacts_data[2]
    overrides = contacts_overrides + [f"data.eval_sets={{other: {other}}}", "eval.baselines=[zero_shot]", "eval.baseline_rows=2"]
    config, pm = configure(None, ["lora", "contacts"], overrides)
    zero = train(config, pm)["baselines"]["zero_shot"]
    for name, source in (("", contacts_data[1]), ("other_", other)):
        first_two = write_jsonl(tmp_path / f"{name}two.jsonl", [json.loads(line) for line in source.read_text().splitlines()[:2]])
        config, pm = configure(
            None, ["lora", "contacts"], contacts_overrides + [f"data.eval={first_two}", f"output_dir={tmp_path / name}x"]
        )
        run = prepare(config, pm, Path(config.output_dir), resume=False)
        alone = evaluate(run.model, run.tokenizer, run.datasets, run.state)
        assert {key: zero[f"eval_{name}{key[5:]}"] for key in without_time(alone)} == pytest.approx(without_time(alone))


def test_few_shot_needs_a_task_plugin_that_supports_it(run_overrides):
    with pytest.raises(ConfigError, match="eval.baselines: few_shot needs a task plugin"):
        configure(None, ["lora"], run_overrides + ["eval.baselines=[few_shot]"])


def test_few_shot_k_beyond_the_training_set_fails_before_the_model_loads(contacts_overrides, monkeypatch):
    config, pm = configure(None, ["lora", "contacts"], contacts_overrides + ["eval.baselines=[few_shot]", "eval.few_shot_k=13"])
    monkeypatch.setattr("ftengine.loop.build", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(DataError, match="eval.few_shot_k=13 is more than the 12 training examples"):
        prepare(config, pm, Path(config.output_dir), resume=False)


# --------------------------------------------------------------------------------------------
# train.group_by_length
# --------------------------------------------------------------------------------------------


def padded_tokens(examples, order, batch_size):
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(len(batch) * max(token_count(examples[i]) for i in batch) for batch in batches)


def test_group_by_length_keeps_every_example_once_per_epoch_and_pads_less():
    generator = torch.Generator().manual_seed(3)
    examples = [{"input_ids": [0] * int(n)} for n in torch.randint(5, 300, (1003,), generator=generator)]
    options = configure(None, ["full"], ["data.train=x.jsonl", "train.batch_size=8", "train.group_by_length=true"])[0].train
    shuffled = configure(None, ["full"], ["data.train=x.jsonl", "train.batch_size=8"])[0].train
    for epoch in (0, 1):
        order = epoch_order(examples, options, epoch)
        assert sorted(order) == list(range(len(examples)))
        assert order == epoch_order(examples, options, epoch)  # seeded: a resumed run sees the same batches
        assert order[-3:] == sorted(order[-3:], key=lambda i: -token_count(examples[i]))  # the short batch stays last
        random_padding = padded_tokens(examples, epoch_order(examples, shuffled, epoch), 8)
        assert padded_tokens(examples, order, 8) < 0.7 * random_padding
    assert epoch_order(examples, options, 0) != epoch_order(examples, options, 1)


def test_group_by_length_trains_and_resumes_exactly(run_overrides, tmp_path):
    overrides = run_overrides + ["train.max_steps=4", "train.save_every=2", "train.batch_size=3", "train.group_by_length=true"]
    config, pm = configure(None, ["full"], overrides + [f"output_dir={tmp_path / 'straight'}"])
    train(config, pm)
    config, pm = configure(None, ["full"], overrides + [f"output_dir={tmp_path / 'resumed'}"])
    pm.register(KillAfter(3))
    with pytest.raises(KeyboardInterrupt):
        train(config, pm)
    config, pm = configure(None, ["full"], overrides + [f"output_dir={tmp_path / 'resumed'}"])
    train(config, pm, resume=True)

    def losses(name):
        return [(r["step"], r["loss"]) for r in records(tmp_path / name) if "loss" in r]

    assert losses("resumed") == losses("straight") and len(losses("straight")) == 4


def test_group_by_length_and_packing_are_one_or_the_other(run_overrides):
    with pytest.raises(ConfigError, match="train.group_by_length: packing already removes the padding"):
        configure(None, ["full"], run_overrides + ["train.packing=true", "train.group_by_length=true"])
