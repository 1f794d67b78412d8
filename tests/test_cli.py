"""The command line end to end on the tiny model."""

import json

from click.testing import CliRunner
from ftengine import __version__
from ftengine.cli import cli
from ftengine.pluginmanager import builtin_plugins


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output == f"ftengine, version {__version__}\n"


def test_plugins_lists_builtins_with_hooks():
    result = invoke("plugins", "--json")
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["sft"]["default"] is True and "ftengine_compute_loss" in rows["sft"]["hooks"]
    assert rows["full"]["source"] == "builtin"
    table = invoke("plugins").output
    first_cells = {line.split("│")[1].strip() for line in table.splitlines() if line.startswith("│")}
    assert set(builtin_plugins()) <= first_cells


def test_run_trains_and_prints_the_evaluation_table(run_overrides, tmp_path):
    args = ["run", "--plugin", "full", "--eval-before"]
    for override in run_overrides:
        args += ["-o", override]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evaluations] == [0, 4]
    rows = [line.split("│")[1:-1] for line in result.output.splitlines() if line.startswith("│")]
    (header,) = [[cell.strip() for cell in line.split("┃")[1:-1]] for line in result.output.splitlines() if line.startswith("┃")]
    assert header == ["metric", "before", "after"]
    assert [cell.strip() for cell in rows[0]] == [
        "loss",
        f"{evaluations[0]['eval_loss']:.3f}",
        f"{evaluations[1]['eval_loss']:.3f}",
    ]
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


def test_run_from_a_yaml_config(run_overrides, tmp_path):
    config = tmp_path / "job.yaml"
    values = dict(o.split("=", 1) for o in run_overrides)
    config.write_text(
        f"model: {values['model']}\nplugins: [full]\noutput_dir: {values['output_dir']}\n"
        f"data:\n  train: {values['data.train']}\ntrain:\n  max_steps: 2\n  batch_size: 4\n"
    )
    result = invoke("run", str(config))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "final" / "config.json").is_file()


def test_bad_input_is_a_message_and_exit_status_2(run_overrides):
    result = invoke("run", "--plugin", "fulll", "-o", "train.lr=-1")
    assert result.exit_code == 2
    assert "plugin 'fulll': unknown. Did you mean 'full'?" in result.output
    assert "Traceback" not in result.output
