"""The command line end to end on the tiny model."""

import json

from click.testing import CliRunner
from ftengine import __version__
from ftengine.cli import cli


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_plugins_lists_builtins_with_hooks():
    result = invoke("plugins", "--json")
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["sft"]["default"] is True and "ftengine_compute_loss" in rows["sft"]["hooks"]
    assert rows["full"]["source"] == "builtin"
    assert "name" in invoke("plugins").output


def test_run_trains_and_prints_the_evaluation_table(run_overrides, tmp_path):
    args = ["run", "--plugin", "full", "--eval-before"]
    for override in run_overrides:
        args += ["-o", override]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    table = result.output[result.output.index("evaluation") :]
    assert "before" in table and "after" in table and "loss" in table
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
