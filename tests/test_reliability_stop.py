"""Never lose a run, part two (issue 22), items 3 and 4: a signal during an evaluation, and a
full disk while appending to ``metrics.jsonl``. Each test reproduced the failure first; the
matrix is in docs/reliability.md.

Signals and file-size limits need real processes: those tests run the ``ftengine`` command of
this environment (``spawn``); the rest run in-process on the tiny model.
"""

import errno
import os
import subprocess

import pytest
from ftengine import loop
from ftengine.build import configure
from ftengine.errors import DataError, StorageError
from ftengine.loop import train
from ftengine.testing import KillAfter
from test_reliability import FTENGINE, TESTS, metrics_lines, run_args, step_losses, strict_json

# --------------------------------------------------------------------------------------------
# 4. a full disk while appending to metrics.jsonl left a torn line that --resume crashed on
# --------------------------------------------------------------------------------------------


def test_4_a_failed_metrics_write_leaves_no_torn_line_names_the_file_and_resumes(run_overrides, tmp_path):
    common = [o for o in run_overrides if not o.startswith("output_dir=")] + ["train.max_steps=4", "train.save_every=1"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(*configure(None, ["lora"], common + [f"output_dir={straight}"]))

    args = run_args(common + [f"output_dir={stopped}"], "lora", "sample_plugins.metrics_limit")  # full after step 2
    env = dict(os.environ, PYTHONPATH=str(TESTS), FTENGINE_TEST_LIMIT_AFTER="2")
    failed = subprocess.run([str(FTENGINE), *args], capture_output=True, text=True, env=env)
    assert failed.returncode == 2, failed.stderr
    message = " ".join(failed.stderr.split())
    assert f"{stopped / 'metrics.jsonl'}: cannot write" in message and "Traceback" not in failed.stderr
    assert [strict_json(line)["step"] for line in metrics_lines(stopped)] == [1, 2]  # whole lines only

    result = subprocess.run(
        [str(FTENGINE), *args, "--resume"], capture_output=True, text=True, env=env | {"FTENGINE_TEST_LIMIT_AFTER": "0"}
    )
    assert result.returncode == 0, result.stderr
    assert step_losses(stopped) == step_losses(straight)


def test_4_no_space_while_appending_truncates_back_to_the_last_whole_record(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    real_write = os.write

    def full_after_10_bytes(fd, data):
        real_write(fd, data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    with loop.MetricsFile(path) as metrics:
        metrics.append({"step": 1, "loss": 1.0})
        monkeypatch.setattr(os, "write", full_after_10_bytes)
        with pytest.raises(StorageError) as error:
            metrics.append({"step": 2, "loss": 0.5})
        monkeypatch.undo()
    assert f"{path}: cannot write" in str(error.value) and "no space left on device" in str(error.value)
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n'


@pytest.fixture
def checkpointed_run(run_overrides):
    """Overrides of a run killed after step 3, with a checkpoint at step 2."""
    overrides = run_overrides + ["train.max_steps=4", "train.save_every=2"]
    config, pm = configure(None, ["lora"], overrides)
    pm.register(KillAfter(3))
    with pytest.raises(KeyboardInterrupt):
        train(config, pm)
    return overrides


def test_4_resume_drops_a_torn_last_metrics_line_and_says_so(checkpointed_run, tmp_path, capsys):
    path = tmp_path / "out" / "metrics.jsonl"
    whole = path.read_text()
    path.write_text(whole + '{"step": 4, "loss": 0.12')
    train(*configure(None, ["lora"], checkpointed_run), resume=True)
    err = " ".join(capsys.readouterr().err.split())
    assert f"{path}:{len(whole.splitlines()) + 1}: dropped a torn last line" in err
    assert [step for step, _ in step_losses(tmp_path / "out")] == [1, 2, 3, 4]


def test_4_a_torn_line_before_the_last_is_an_error_naming_file_and_line(checkpointed_run, tmp_path):
    path = tmp_path / "out" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:15]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"{path}:2: not a whole JSON record") as error:
        train(*configure(None, ["lora"], checkpointed_run), resume=True)
    assert "repair or delete that line" in str(error.value)
    assert path.read_text().splitlines() == lines  # nothing rewritten
