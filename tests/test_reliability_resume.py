"""Never lose a run, part two (issue 22), item 7: ``--resume`` accepted what it should question.

A changed training file, an edited, truncated or missing checkpoint file, NaN weights marked
healthy: each is reported, and resume falls back to the newest checkpoint that verifies. Every
test failed on the code before the change. The matrix is in docs/reliability.md.
"""

import json

import pytest
import torch
from ftengine import checkpoint
from ftengine.build import configure
from ftengine.errors import DataError, FtengineError
from ftengine.loop import train
from safetensors.torch import load_file, save_file

STEP_2, STEP_4 = "step-000002", "step-000004"


@pytest.fixture
def finished_run(run_overrides, tmp_path):
    """A LoRA run of 4 steps with checkpoints at steps 2 and 4: its ``-o`` overrides."""
    overrides = run_overrides + ["train.max_steps=4", "train.save_every=2"]
    train(*configure(None, ["lora"], overrides))
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path / "out")] == [STEP_2, STEP_4]
    return overrides


def resume(overrides, max_steps=6):
    """Resume the run, extended to ``max_steps``; return its summary."""
    return train(*configure(None, ["lora"], overrides + [f"train.max_steps={max_steps}"]), resume=True)


def flat(text):
    return " ".join(text.split())


def rewrite_state(ckpt, **changes):
    record = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps(record | changes))


def nan_weights(ckpt):
    tensors = load_file(ckpt / "trainable.safetensors")
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, ckpt / "trainable.safetensors")


def forge_manifest(ckpt):
    """Rewrite the manifest so that it matches the (edited) files, as a careless tool might."""
    (ckpt / checkpoint.MANIFEST).unlink()
    checkpoint.write_manifest(ckpt)


def test_7_a_changed_training_file_is_refused_naming_it(finished_run, tiny_data, capsys):
    train_file, _ = tiny_data
    first, *rest = train_file.read_text().splitlines(keepends=True)
    train_file.write_text("".join([*rest, first]))  # the same rows, the first one moved to the end
    with pytest.raises(DataError) as error:
        resume(finished_run)
    message = flat(str(error.value))
    assert str(train_file) in message and "changed since the run started" in message
    assert "restore it" in message and "start a new run" in message


DAMAGES = {
    "truncated trainable.safetensors": lambda c: (c / "trainable.safetensors").write_bytes(
        (c / "trainable.safetensors").read_bytes()[:-20]
    ),
    "missing trainable.safetensors": lambda c: (c / "trainable.safetensors").unlink(),
    "missing state.json": lambda c: (c / "state.json").unlink(),
    "truncated state.json": lambda c: (c / "state.json").write_text((c / "state.json").read_text()[:30]),
    "truncated optimizer.pt": lambda c: (c / "optimizer.pt").write_bytes((c / "optimizer.pt").read_bytes()[:100]),
    "deleted config.json": lambda c: (c / "config.json").unlink(),
    "state.json step edited": lambda c: rewrite_state(c, step=3),
    "NaN weights marked healthy": nan_weights,
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_7_a_damaged_checkpoint_is_named_and_resume_falls_back(damage, finished_run, tmp_path, capsys):
    DAMAGES[damage](tmp_path / "out" / "checkpoints" / STEP_4)
    summary = resume(finished_run)
    err = flat(capsys.readouterr().err)
    assert f"{STEP_4}" in err and "failed verification" in err, err
    assert f"resuming from {tmp_path / 'out' / 'checkpoints' / STEP_2}" in err
    assert summary["after"]["step"] == 6


@pytest.mark.parametrize("forgery", ["NaN weights", "step edited"])
def test_7_a_forged_manifest_does_not_hide_nan_weights_or_a_wrong_step(forgery, finished_run, tmp_path, capsys):
    ckpt = tmp_path / "out" / "checkpoints" / STEP_4
    nan_weights(ckpt) if forgery == "NaN weights" else rewrite_state(ckpt, step=2)
    forge_manifest(ckpt)
    resume(finished_run)
    err = flat(capsys.readouterr().err)
    reason = "NaN or infinity" if forgery == "NaN weights" else "state.json says step 2"
    assert f"{STEP_4} failed verification" in err and reason in err, err
    assert f"resuming from {tmp_path / 'out' / 'checkpoints' / STEP_2}" in err


def test_7_an_old_checkpoint_without_a_manifest_still_resumes_with_a_note(finished_run, tmp_path, capsys):
    for ckpt in checkpoint.checkpoint_dirs(tmp_path / "out"):
        (ckpt / checkpoint.MANIFEST).unlink()
        rewrite_state(ckpt, data_sha256=None)  # older versions recorded no data hashes either
    summary = resume(finished_run)
    err = flat(capsys.readouterr().err)
    assert f"{STEP_4} has no manifest" in err and "written by an earlier version" in err, err
    assert summary["after"]["step"] == 6
    assert (tmp_path / "out" / "checkpoints" / "step-000006" / checkpoint.MANIFEST).is_file()


def test_7_no_checkpoint_that_verifies_is_a_message(finished_run, tmp_path):
    for ckpt in checkpoint.checkpoint_dirs(tmp_path / "out"):
        (ckpt / "trainable.safetensors").unlink()
    with pytest.raises(FtengineError) as error:
        resume(finished_run)
    message = flat(str(error.value))
    assert STEP_2 in message and STEP_4 in message and "trainable.safetensors is missing" in message
    assert "--overwrite" in message


def test_7_a_killed_runs_temporary_checkpoints_are_removed_at_the_next_start(finished_run, tmp_path):
    root = tmp_path / "out" / "checkpoints"
    leftovers = [root / ".step-000006.k3_x9a0q.tmp", root / ".step-000004.abcdefgh.tmp"]
    others = [root / ".step-000006.mine.tmp", root / "notes.tmp", root / ".step-000006.old"]
    for path in leftovers + others:
        path.mkdir()
        (path / "trainable.safetensors").write_bytes(b"half")
    resume(finished_run)
    assert not any(p.exists() for p in leftovers)
    assert all(p.exists() for p in others), "only the checkpoint writer's own temporaries are removed"
