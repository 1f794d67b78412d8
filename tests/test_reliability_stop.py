"""Never lose a run, part two (issue 22), items 3 and 4: a signal during an evaluation, and a
full disk while appending to ``metrics.jsonl``. Each test reproduced the failure first; the
matrix is in docs/reliability.md.

Signals and file-size limits need real processes: those tests run the ``ftengine`` command of
this environment (``spawn``); the rest run in-process on the tiny model.
"""

import errno
import os
import signal
import subprocess
import time

import pytest
from ftengine import checkpoint, loop
from ftengine.build import configure
from ftengine.errors import DataError, StorageError
from ftengine.loop import train
from ftengine.testing import KillAfter
from test_reliability import FTENGINE, TESTS, metrics_lines, run_args, spawn, step_losses, strict_json, wait_for

SLOW_EVAL = "sample_plugins.slow_eval"


def evaluations(output_dir):
    """``{step: record}`` of the evaluation records, without their timing."""
    records = [strict_json(line) for line in metrics_lines(output_dir)]
    return {r["step"]: {k: v for k, v in r.items() if k != "eval_time_s"} for r in records if "eval_loss" in r}


def resume(stderr):
    """Run the ``ftengine run ... --resume`` command an interrupted run printed last."""
    command = stderr.strip().splitlines()[-1].strip()
    assert command.startswith("ftengine run") and command.endswith("--resume"), stderr
    env = dict(os.environ, PYTHONPATH=str(TESTS), FTENGINE_TEST_EVAL_SLEEP="0")
    return subprocess.run([str(FTENGINE), *command.split()[1:]], capture_output=True, text=True, env=env)


def last_step_logged(output_dir, step):
    return lambda: any(
        strict_json(line).get("step") == step and "loss" in strict_json(line) for line in metrics_lines(output_dir)
    )


# --------------------------------------------------------------------------------------------
# 3. a stop signal during an evaluation lost the run, or waited for the whole evaluation
# --------------------------------------------------------------------------------------------


@pytest.fixture
def straight_run(run_overrides, tmp_path):
    """``(overrides without output_dir, the output_dir of the uninterrupted run)``: 4 steps, an
    evaluation after step 2 and at the end, no checkpoints (``save_every: 0``)."""
    common = [o for o in run_overrides if not o.startswith("output_dir=")]
    common += ["train.max_steps=4", "train.eval_every=2", "train.eval_batch_size=1", "train.save_every=0"]
    straight = tmp_path / "straight"
    train(*configure(None, ["lora", SLOW_EVAL], common + [f"output_dir={straight}"]))
    return common, straight


def test_3_sigterm_during_a_mid_run_evaluation_checkpoints_at_once_and_resumes_exactly(straight_run, tmp_path, monkeypatch):
    common, straight = straight_run
    stopped = tmp_path / "stopped"
    monkeypatch.setenv("FTENGINE_TEST_EVAL_SLEEP", "8")  # per eval batch: 4 batches, 32 s
    process = spawn(run_args(common + [f"output_dir={stopped}"], "lora", SLOW_EVAL))
    wait_for(last_step_logged(stopped, 2), what="step 2, then its evaluation")
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert time.monotonic() - started < 20, "the evaluation must stop at the next batch, not run to its end"
    assert "Traceback" not in stderr and "SIGTERM" in stderr
    assert checkpoint.latest_checkpoint(stopped).name == "step-000002"

    resumed = resume(stderr)
    assert resumed.returncode == 0, resumed.stderr
    assert step_losses(stopped) == step_losses(straight)
    assert evaluations(stopped) == evaluations(straight)  # the cut evaluation of step 2 is done again


def test_3_sigterm_during_the_final_evaluation_keeps_the_result_and_resumes_exactly(straight_run, tmp_path, monkeypatch):
    common, straight = straight_run
    stopped = tmp_path / "stopped"
    monkeypatch.setenv("FTENGINE_TEST_EVAL_SLEEP", "8")
    process = spawn(run_args(common + [f"output_dir={stopped}", "train.eval_every=0"], "lora", SLOW_EVAL))
    wait_for(last_step_logged(stopped, 4), what="the last step")
    wait_for(lambda: (stopped / "final").is_dir(), timeout=60, what="final/ saved before the final evaluation")
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert time.monotonic() - started < 20
    message = " ".join(stderr.split())
    assert "Traceback" not in stderr and f"{stopped / 'final'}" in message
    assert checkpoint.latest_checkpoint(stopped).name == "step-000004"

    resumed = resume(stderr)
    assert resumed.returncode == 0, resumed.stderr
    assert step_losses(stopped) == step_losses(straight)
    assert evaluations(stopped)[4] == evaluations(straight)[4]
    final = "final/adapter_model.safetensors"
    assert (stopped / final).read_bytes() == (straight / final).read_bytes()


def test_3_a_second_sigterm_during_the_final_evaluation_loses_nothing(run_overrides, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("FTENGINE_TEST_EVAL_SLEEP", "8")
    overrides = run_overrides + ["train.max_steps=2", "train.eval_batch_size=1", "train.save_every=0"]
    process = spawn(run_args(overrides, "lora", SLOW_EVAL))
    wait_for(last_step_logged(out, 2), what="the last step")
    wait_for(lambda: (out / "final").is_dir(), timeout=60, what="final/ saved before the final evaluation")
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert (out / "final" / "adapter_model.safetensors").is_file()


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
