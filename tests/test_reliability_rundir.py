"""Never lose a run, part two (issue 22), items 1, 2 and 8 (``~``): the output_dir a run claims.
Each test reproduced the failure first; the matrix is in docs/reliability.md."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from ftengine.build import configure
from ftengine.cli import cli
from ftengine.errors import RunDirError
from ftengine.loop import train
from ftengine.rundir import LOCK_FILE, RUN_FILES


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def run_args(overrides, *flags):
    args = ["run", "--plugin", "lora", *flags]
    for override in overrides:
        args += ["-o", override]
    return args


def one_line(text):
    return " ".join(text.split())


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    """A private copy of the tiny model (a failing run must not damage the shared one)."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "m"))


def tokenizer_only(model_dir, target):
    """A model directory without weights: a run that reaches the weights fails there."""
    target.mkdir()
    for item in model_dir.iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, target / item.name)
    return target


def snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# 1. a run wrote over the base model, the data, or a user's own config.json
# --------------------------------------------------------------------------------------------


def test_1_an_output_dir_that_is_or_lies_inside_the_model_directory_is_refused(run_overrides, model_copy, tmp_path):
    before = snapshot(model_copy)
    (tmp_path / "link").symlink_to(model_copy)
    for output_dir in (model_copy, model_copy / "run", model_copy / "sub" / "..", tmp_path / "link"):
        result = invoke(*run_args(run_overrides + [f"model={model_copy}", f"output_dir={output_dir}"]))
        assert result.exit_code == 2, result.output
        message = one_line(result.output)
        assert "the model directory (model" in message and "choose an output_dir outside it" in message, message
        assert "Traceback" not in result.output
    assert snapshot(model_copy) == before
    assert not (model_copy / "run").exists() and not (model_copy / "sub").exists()


def test_1_an_output_dir_holding_the_model_or_the_data_is_refused(run_overrides, model_copy, tiny_data, tmp_path):
    train_file, _ = tiny_data
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copy(train_file, data_dir / "train.jsonl")
    cases = [
        ([f"model={model_copy}", f"output_dir={tmp_path}"], "contains the model directory"),
        ([f"data.train={data_dir}", f"output_dir={data_dir / 'run'}"], "lies inside the training data (data.train"),
        ([f"output_dir={train_file.parent}"], "contains the training data (data.train"),
        ([f"data.eval_sets.extra={data_dir / 'train.jsonl'}", f"output_dir={data_dir}"], "data.eval_sets.extra"),
    ]
    for overrides, expected in cases:
        with pytest.raises(RunDirError) as error:
            train(*configure(None, ["lora"], run_overrides + overrides))
        assert expected in one_line(str(error.value)), str(error.value)
    assert not (data_dir / "run").exists() and not (tmp_path / "config.json").exists()


def test_1_a_users_own_files_are_named_and_kept_even_with_overwrite(run_overrides, model_copy, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    user_files = {
        "config.json": json.dumps({"name": "my-app", "version": 3}),
        "metrics.jsonl": '{"accuracy": 0.9}\n',
        "report.png": "my own chart",
    }
    for name, text in user_files.items():
        (project / name).write_text(text)
    (project / "checkpoints").mkdir()
    (project / "checkpoints" / "checkpoint-500").mkdir()
    no_weights = tokenizer_only(model_copy, tmp_path / "no-weights")  # refused before the weights load
    for flags in ((), ("--overwrite",)):
        result = invoke(*run_args(run_overrides + [f"model={no_weights}", f"output_dir={project}"], *flags))
        assert result.exit_code == 2, result.output
        message = one_line(result.output)
        assert "not an ftengine run's" in message and "config.json" in message and "metrics.jsonl" in message
        assert "checkpoints/" in message and "report.png" in message
        assert "--overwrite moves only a run's files" in message
    assert {name: (project / name).read_text() for name in user_files} == user_files
    assert sorted(p.name for p in project.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl", "report.png"]


def test_1_a_runs_own_files_are_recognised_and_overwrite_moves_only_them(run_overrides, tmp_path):
    out = tmp_path / "out"
    train(*configure(None, ["lora"], run_overrides + ["train.max_steps=1", "train.save_every=1"]))
    (out / ".notes.tmp").write_text("mine")  # hidden, but not a run's temporary
    (out / ".config.json.x1y2.tmp").write_text("{")  # what an interrupted atomic write leaves
    train(*configure(None, ["lora"], run_overrides + ["train.max_steps=1"]), overwrite=True)
    (moved,) = out.glob("replaced-*")
    assert (moved / "config.json").is_file() and (moved / "checkpoints" / "step-000001").is_dir()
    assert (moved / ".config.json.x1y2.tmp").is_file()
    assert (out / ".notes.tmp").read_text() == "mine"


# --------------------------------------------------------------------------------------------
# 2. a symlinked run file wrote through to its target
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [LOCK_FILE, *RUN_FILES])
def test_2_a_symlinked_run_file_is_refused_and_its_target_kept(name, run_overrides, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / name).symlink_to(victim)
    result = invoke(*run_args(run_overrides))
    assert result.exit_code == 2, result.output
    message = one_line(result.output)
    assert f"{out / name}: is a symbolic link (to {victim})" in message and "remove the link" in message, message
    assert victim.read_text() == "precious"
    assert (out / name).is_symlink()


def test_2_the_lock_and_metrics_are_opened_without_following_links(tmp_path):
    from ftengine.rundir import open_run_file

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(RunDirError, match="is a symbolic link"):
        open_run_file(tmp_path / "metrics.jsonl", "a")
    assert victim.read_text() == "precious"


# --------------------------------------------------------------------------------------------
# 8. output_dir: ~/x created a literal '~' directory
# --------------------------------------------------------------------------------------------


def test_8_a_leading_tilde_is_the_home_directory_in_every_path_key(run_overrides, model_copy, tiny_data, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    shutil.move(model_copy, home / "m")
    for path in tiny_data:
        shutil.move(path, home / path.name)
    overrides = ["model=~/m", "data.train=~/train.jsonl", "data.eval=~/eval.jsonl", "output_dir=~/runs/x"]
    config, pm = configure(None, ["lora"], run_overrides + overrides + ["train.max_steps=1"])
    assert (config.model, config.output_dir) == (str(home / "m"), str(home / "runs" / "x"))
    train(config, pm)
    assert (home / "runs" / "x" / "final").is_dir()
    assert not (tmp_path / "~").exists()
