"""Never lose a user's work (issue 15): one test (or a few) per numbered point of the issue,
each reproducing the failure first. The matrix is in docs/reliability.md.

Runs that must be separate processes (two runs at once, SIGTERM) use the real ``ftengine``
command of this environment; the rest run in-process on the tiny model.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from ftengine import checkpoint
from ftengine.build import build, configure
from ftengine.cli import cli
from ftengine.errors import ConfigError, DataError, FtengineError, PluginError
from ftengine.loop import train
from ftengine.testing import KillAfter, write_jsonl
from safetensors.torch import load_file, save_file

FTENGINE = Path(sys.executable).parent / "ftengine"
TESTS = Path(__file__).parent


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def run_args(overrides, *plugins):
    args = ["run"]
    for plugin in plugins:
        args += ["--plugin", plugin]
    for override in overrides:
        args += ["-o", override]
    return args


def spawn(args, step_sleep="0", hold_file=""):
    """Start ``ftengine ARGS`` as a real process (sample plugins importable); with ``hold_file``,
    ``sample_plugins.slow`` holds it after each step while that file exists."""
    env = dict(os.environ, PYTHONPATH=str(TESTS), FTENGINE_TEST_STEP_SLEEP=step_sleep, FTENGINE_TEST_HOLD_FILE=str(hold_file))
    return subprocess.Popen([str(FTENGINE), *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout=120, what="a condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def metrics_lines(output_dir):
    path = Path(output_dir) / "metrics.jsonl"
    return path.read_text().splitlines() if path.is_file() else []


def strict_json(line):
    """``json.loads`` that refuses NaN and Infinity, as every other JSON parser does."""

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(line, parse_constant=refuse)


def step_losses(output_dir):
    records = [strict_json(line) for line in metrics_lines(output_dir)]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


@pytest.fixture
def lora_run(run_overrides, tmp_path):
    """A finished LoRA run on the tiny model: its output_dir."""
    train(*configure(None, ["lora"], run_overrides + ["train.max_steps=2"]))
    return tmp_path / "out"


# --------------------------------------------------------------------------------------------
# 1. merge --out deleted whatever the directory held
# --------------------------------------------------------------------------------------------


def test_1_merge_refuses_a_non_empty_out_and_the_adapters_own_directory(lora_run, tiny_model_dir, tmp_path):
    adapter = lora_run / "final"
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("my notes")

    result = invoke("merge", "--model", tiny_model_dir, "--adapter", adapter, "--out", notes)
    assert result.exit_code == 2 and "not empty" in result.output and "--overwrite" in result.output
    assert (notes / "todo.txt").read_text() == "my notes"

    for out in (adapter, lora_run, tmp_path):  # the adapter itself, or a directory holding it
        before = sorted(p.name for p in adapter.iterdir())
        result = invoke("merge", "--model", tiny_model_dir, "--adapter", adapter, "--out", out, "--overwrite")
        assert result.exit_code == 2 and "the adapter being merged" in result.output, result.output
        assert sorted(p.name for p in adapter.iterdir()) == before

    result = invoke("merge", "--model", tiny_model_dir, "--adapter", adapter, "--out", notes, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (notes / "model.safetensors").is_file() and not (notes / "todo.txt").exists()


# --------------------------------------------------------------------------------------------
# 2. two runs into one output_dir both "succeeded", interleaving their files
# --------------------------------------------------------------------------------------------


def test_2_a_second_run_into_a_busy_output_dir_is_refused_at_once(run_overrides, tmp_path):
    out = tmp_path / "out"
    args = run_args(run_overrides + ["train.max_steps=6"], "lora", "sample_plugins.slow")
    hold = tmp_path / "hold"
    hold.touch()  # the first run waits after its first step until the second has been refused
    first = spawn(args, step_sleep="0", hold_file=hold)
    try:
        wait_for(lambda: metrics_lines(out), what="the first run's first step")
        started = time.monotonic()
        second = subprocess.run(
            [str(FTENGINE), *args], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(TESTS))
        )
        assert time.monotonic() - started < 60
        assert second.returncode == 2, second.stderr
        message = " ".join(second.stderr.split())
        assert f"pid {first.pid}" in message and "another ftengine run" in message
        assert "Traceback" not in second.stderr
        assert first.poll() is None, "the first run must still be running"
    finally:
        hold.unlink()
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert [step for step, _ in step_losses(out)] == [1, 2, 3, 4, 5, 6]
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["train"]["max_steps"] == 6


def test_2_a_lock_left_by_a_dead_run_is_taken_over(run_overrides, tmp_path):
    from ftengine.rundir import LOCK_FILE, claim_output_dir

    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_FILE).write_text(f"{dead.pid}\n")
    with claim_output_dir(out) as run_dir:
        assert run_dir.stale_pid == dead.pid
        assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(FtengineError, match=f"pid {os.getpid()}"), claim_output_dir(out):
            pass
    train(*configure(None, ["lora"], run_overrides + ["train.max_steps=1"]))


# --------------------------------------------------------------------------------------------
# 3. a fresh run into an old run's directory mixed with it
# --------------------------------------------------------------------------------------------


def test_3_a_fresh_run_into_an_earlier_runs_directory_needs_resume_or_overwrite(run_overrides, tmp_path):
    out = tmp_path / "out"
    old_run = run_overrides + ["train.max_steps=6", "train.save_every=3"]
    train(*configure(None, ["lora"], old_run))
    old_final = (out / "final" / "adapter_model.safetensors").read_bytes()

    new_run = run_overrides + ["train.max_steps=2", "train.save_every=1", "train.seed=7"]
    with pytest.raises(FtengineError) as error:
        train(*configure(None, ["lora"], new_run))
    assert "--resume" in str(error.value) and "--overwrite" in str(error.value) and "step-000006" in str(error.value)
    assert [p.name for p in checkpoint.checkpoint_dirs(out)] == ["step-000003", "step-000006"]

    result = invoke(*run_args(new_run, "lora"))
    assert result.exit_code == 2 and "--overwrite" in result.output

    train(*configure(None, ["lora"], new_run), overwrite=True)
    assert [p.name for p in checkpoint.checkpoint_dirs(out)] == ["step-000001", "step-000002"]
    assert [step for step, _ in step_losses(out)] == [1, 2]
    (moved,) = out.glob("replaced-*")
    assert (moved / "final" / "adapter_model.safetensors").read_bytes() == old_final
    assert [p.name for p in checkpoint.checkpoint_dirs(moved)] == ["step-000003", "step-000006"]


# --------------------------------------------------------------------------------------------
# 4. NaN was not detected: lr=1e30 ran to the end, pruned the good checkpoints, saved NaN
# --------------------------------------------------------------------------------------------


def test_4_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(run_overrides, tmp_path):
    out = tmp_path / "out"
    overrides = run_overrides + ["train.max_steps=8", "train.save_every=1", "train.lr=1e30", "train.warmup_steps=0"]
    result = invoke(*run_args(overrides, "full"))
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "the optimiser step was not taken" in message and "train.lr=1e+30" in message
    assert "Traceback" not in result.output
    assert not (out / "final").exists()
    records = [strict_json(line) for line in metrics_lines(out)]  # valid JSON: no NaN/Infinity
    stopped = records[-1]
    assert stopped["skipped"] == "nonfinite" and f"step {stopped['step']}" in message

    good = checkpoint.latest_checkpoint(out)
    assert good is not None and good.name == f"step-{stopped['step'] - 1:06d}" and str(good) in message
    config, pm = configure(None, ["full"], overrides)
    model, _, _ = build(config, pm)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = pm.hook.ftengine_make_optimizer(model=model, params=list(params.items()), config=config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    checkpoint.load_checkpoint(good, params, optimizer, scheduler)
    assert all(torch.isfinite(p).all() for p in params.values())


def test_4_skip_mode_skips_nonfinite_steps_then_stops_and_metrics_stay_json(run_overrides, tmp_path):
    overrides = run_overrides + ["train.max_steps=6", "lora.alpha=1e30", "train.on_nonfinite=skip", "train.max_nonfinite_skips=2"]
    with pytest.raises(FtengineError, match="more than train.max_nonfinite_skips=2"):
        train(*configure(None, ["lora"], overrides))
    records = [strict_json(line) for line in metrics_lines(tmp_path / "out")]
    assert [r["skipped"] for r in records] == ["nonfinite"] * 3
    assert all(r["grad_norm"] is None or isinstance(r["grad_norm"], float) for r in records)


def test_4_pruning_never_removes_the_last_healthy_checkpoint(run_overrides, tmp_path):
    config, pm = configure(None, ["lora"], run_overrides)
    model, _, _ = build(config, pm)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = pm.hook.ftengine_make_optimizer(model=model, params=list(params.items()), config=config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    out = tmp_path / "ckpts"
    checkpoint.save_checkpoint(out, 1, params, optimizer, scheduler, {"tokens_seen": 0})
    for step in (2, 3, 4):
        checkpoint.save_checkpoint(out, step, params, optimizer, scheduler, {"tokens_seen": 0}, healthy=False)
    assert [p.name for p in checkpoint.checkpoint_dirs(out)] == ["step-000001", "step-000003", "step-000004"]
    assert checkpoint.latest_checkpoint(out).name == "step-000001"


def test_4_merge_refuses_to_write_a_model_with_nonfinite_weights(lora_run, tiny_model_dir, tmp_path):
    weights = lora_run / "final" / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if "lora_B" in k)
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, weights, metadata={"format": "pt"})
    result = invoke("merge", "--model", tiny_model_dir, "--adapter", lora_run / "final", "--out", tmp_path / "merged")
    assert result.exit_code == 2 and "NaN or infinite weights" in result.output, result.output
    assert not (tmp_path / "merged").exists()


# --------------------------------------------------------------------------------------------
# 5. --resume unpickled rng.pt: a crafted checkpoint ran code; pickle-only models loaded silently
# --------------------------------------------------------------------------------------------


class _CreatesAFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_5_a_crafted_rng_pt_is_refused_and_runs_no_code(run_overrides, tmp_path):
    out = tmp_path / "out"
    overrides = run_overrides + ["train.max_steps=4", "train.save_every=2"]
    config, pm = configure(None, ["lora"], overrides)
    pm.register(KillAfter(3))
    with pytest.raises(KeyboardInterrupt):
        train(config, pm)
    (ckpt,) = checkpoint.checkpoint_dirs(out)
    rng_without_pickle = not (ckpt / "rng.pt").exists()
    (ckpt / "rng.safetensors").unlink(missing_ok=True)
    (ckpt / checkpoint.MANIFEST).unlink()  # a checkpoint from before manifests (else it fails verification)
    marker = tmp_path / "pwned"
    torch.save({"torch": _CreatesAFile(marker), "python": None}, ckpt / "rng.pt")  # pickles the object

    result = CliRunner().invoke(cli, [*run_args(overrides, "lora"), "--resume"])
    assert not marker.exists(), "unpickling the checkpoint ran code"
    assert result.exit_code == 2, result.output
    assert "refused to load" in " ".join(result.output.split())
    assert rng_without_pickle, "the RNG state must be stored without pickle"


def test_5_a_pickle_only_model_is_refused_unless_allowed(run_overrides, tiny_model_dir, tmp_path):
    from ftengine.testing import tiny_model, tiny_tokenizer

    pickled = tmp_path / "pickled-model"
    model = tiny_model()
    model.save_pretrained(pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    tiny_tokenizer().save_pretrained(pickled)

    args = run_args([*run_overrides, f"model={pickled}", "train.max_steps=1"], "lora")
    result = invoke(*args)
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and "only pickle weights" in message and "save_pretrained" in message
    assert "--allow-pickle" in message
    assert invoke(*args, "--allow-pickle").exit_code == 0


# --------------------------------------------------------------------------------------------
# 6. --resume did not compare the config with the checkpoint's
# --------------------------------------------------------------------------------------------


@pytest.fixture
def interrupted_lora_run(run_overrides):
    overrides = run_overrides + ["train.max_steps=4", "train.save_every=2"]
    config, pm = configure(None, ["lora"], overrides)
    pm.register(KillAfter(3))
    with pytest.raises(KeyboardInterrupt):
        train(config, pm)
    return overrides


@pytest.mark.parametrize("change", [["lora.r=4"], ["train.lr=5e-3"], ["lora.alpha=64", "train.seed=3"]])
def test_6_resume_with_a_changed_training_key_names_it(interrupted_lora_run, change):
    with pytest.raises(ConfigError) as error:
        train(*configure(None, ["lora"], interrupted_lora_run + change), resume=True)
    for override in change:
        assert f"{override.split('=')[0]}:" in str(error.value)
    assert "step-000002" in str(error.value)


def test_6_resume_accepts_safe_changes_and_says_so(interrupted_lora_run, tmp_path, capsys):
    overrides = interrupted_lora_run + ["train.max_steps=5", "train.log_every=2"]
    train(*configure(None, ["lora"], overrides), resume=True)
    err = " ".join(capsys.readouterr().err.split())
    assert "accepted train.max_steps: 4 -> 5" in err and "accepted train.log_every: 1 -> 2" in err
    assert [step for step, _ in step_losses(tmp_path / "out")][-1] == 5


# --------------------------------------------------------------------------------------------
# 7. Ctrl-C / SIGTERM lost the run: no checkpoint, no resume hint
# --------------------------------------------------------------------------------------------


def test_7_sigterm_checkpoints_and_resume_equals_the_uninterrupted_run(run_overrides, tmp_path):
    common = [o for o in run_overrides if not o.startswith("output_dir=")] + ["train.max_steps=6"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(*configure(None, ["lora", "sample_plugins.slow"], common + [f"output_dir={straight}"]))

    args = run_args(common + [f"output_dir={stopped}"], "lora", "sample_plugins.slow")
    process = spawn(args, step_sleep="0.5")
    wait_for(lambda: metrics_lines(stopped), what="the first metrics line")
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    message = " ".join(stderr.split())
    assert "SIGTERM: stopped after step" in message and "Traceback" not in stderr
    resume_line = stderr.strip().splitlines()[-1].strip()
    assert resume_line.startswith("ftengine run") and resume_line.endswith("--resume")
    assert checkpoint.latest_checkpoint(stopped) is not None  # with save_every: 0
    assert len(step_losses(stopped)) < 6

    resumed = subprocess.run(
        [str(FTENGINE), *resume_line.split()[1:]],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(TESTS), FTENGINE_TEST_STEP_SLEEP="0"),
    )
    assert resumed.returncode == 0, resumed.stderr
    assert step_losses(stopped) == step_losses(straight)


def test_7_a_second_ctrl_c_stops_at_once(run_overrides, tmp_path):
    out = tmp_path / "out"
    process = spawn(run_args(run_overrides + ["train.max_steps=3"], "lora", "sample_plugins.slow"), step_sleep="30")
    wait_for(lambda: metrics_lines(out), what="the first metrics line")
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert time.monotonic() - started < 20, "the second Ctrl-C must not wait for the step"
    assert process.returncode == 130, stderr
    assert "Ctrl-C again stops at once" in stderr and "Traceback" not in stderr


# --------------------------------------------------------------------------------------------
# 8. raw tracebacks instead of messages
# --------------------------------------------------------------------------------------------


def test_8_invalid_utf8_and_unknown_formats_are_messages(run_overrides, tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "ok", "response": "fine"}\n{"prompt": "caf\xe9", "response": "x"}\n')
    result = invoke(*run_args(run_overrides + [f"data.train={bad}"], "lora"))
    assert result.exit_code == 2 and f"{bad}:2: not valid UTF-8 (byte 0xe9" in " ".join(result.output.split())

    sheet = tmp_path / "train.xlsx"
    sheet.write_bytes(b"PK\x03\x04 a spreadsheet")
    result = invoke(*run_args(run_overrides + [f"data.train={sheet}"], "lora"))
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and f"{sheet}: unknown data format '.xlsx'" in message and "Parquet" in message
    assert "Traceback" not in result.output


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_8_an_empty_or_truncated_adapter_file_is_a_message(damage, lora_run, tiny_model_dir, tmp_path):
    weights = lora_run / "final" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    result = invoke("merge", "--model", tiny_model_dir, "--adapter", lora_run / "final", "--out", tmp_path / "m")
    assert result.exit_code == 2 and str(weights) in result.output.replace("\n", "")
    assert damage in result.output


def test_8_an_output_dir_that_is_a_file_is_a_message(run_overrides, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    result = invoke(*run_args(run_overrides + [f"output_dir={target}"], "lora"))
    assert result.exit_code == 2 and "is a file, not a directory" in result.output
    assert target.read_text() == "keep me"


def _mount_tmpfs(path, options):
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(result.stderr or result.stdout).strip()}); needs root and mount rights")


@pytest.fixture
def mount_point(tmp_path):
    path = tmp_path / "mnt"
    yield path
    subprocess.run(["umount", str(path)], capture_output=True)


def test_8_an_unwritable_output_dir_is_a_message(run_overrides, mount_point):
    _mount_tmpfs(mount_point, "ro,size=1m")
    result = invoke(*run_args(run_overrides + [f"output_dir={mount_point / 'out'}"], "lora"))
    assert result.exit_code == 2, result.output
    assert "cannot create it (Read-only file system)" in " ".join(result.output.split())


def test_8_a_full_disk_names_the_path_and_keeps_the_previous_checkpoint(run_overrides, mount_point):
    _mount_tmpfs(mount_point, "size=4m")
    out = mount_point / "out"
    overrides = run_overrides + [f"output_dir={out}", "train.max_steps=4", "train.save_every=1"]
    result = invoke(*run_args(overrides, "lora", "sample_plugins.fill_disk"))  # fills the disk after step 1
    message = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "no space left on device" in message and str(out / "checkpoints" / "step-000002") in message
    assert f"The previous checkpoint {out / 'checkpoints' / 'step-000001'} is intact" in message
    assert "Traceback" not in result.output
    (out / "filler.bin").unlink()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]  # no half-written one
    config, pm = configure(None, ["lora"], overrides)
    model, _, _ = build(config, pm)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = pm.hook.ftengine_make_optimizer(model=model, params=list(params.items()), config=config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    assert checkpoint.load_checkpoint(out / "checkpoints" / "step-000001", params, optimizer, scheduler)["step"] == 1


def test_8_storage_errors_say_no_space_for_every_library(tmp_path):
    import errno

    from safetensors import SafetensorError

    cases = [
        OSError(errno.ENOSPC, "No space left on device"),
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    ]
    for exc in cases:
        error = checkpoint.storage_error(exc, tmp_path / "x", "checkpoint step 2", "The previous checkpoint y is intact")
        assert (
            type(error).__name__ == "StorageError"
            and "no space left on device" in str(error)
            and str(tmp_path / "x") in str(error)
        )


# --------------------------------------------------------------------------------------------
# 9. data errors after the model loaded, and unhelpful messages
# --------------------------------------------------------------------------------------------


def test_9_data_is_checked_before_the_model_weights_load(run_overrides, tiny_model_dir, tmp_path):
    no_weights = tmp_path / "tokenizer-only"
    no_weights.mkdir()
    for item in tiny_model_dir.iterdir():
        if item.suffix != ".safetensors":
            (no_weights / item.name).write_bytes(item.read_bytes())
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a"}])
    with pytest.raises(DataError, match=f"{bad}:2: missing field 'response'"):
        train(*configure(None, ["lora"], run_overrides + [f"model={no_weights}", f"data.train={bad}"]))


def test_9_data_messages_name_the_problem_and_the_format(run_overrides, tmp_path):
    def error(path, *plugins):
        with pytest.raises(DataError) as raised:
            train(*configure(None, ["lora", *plugins], run_overrides + [f"data.train={path}"]))
        return " ".join(str(raised.value).split())

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("not data")
    assert f"{folder}: the directory holds no data files" in error(folder)
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([{"prompt": "a", "response": "b"}, {"prompt": "a"}], indent=2))
    assert f"{array}[1]: missing field 'response'" in error(array)
    table = tmp_path / "rows.csv"
    table.write_text("question,answer\na,b\n")
    assert "expected a 'messages' list" in error(table) and "data.fields" in error(table)
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}])
    message = error(sft, "dpo")
    assert "expects preference rows" in message and "chosen" in message and "without --plugin dpo" in message


def test_9_config_and_plugin_messages(run_overrides, tmp_path):
    with pytest.raises(ConfigError, match=r"Did you mean 'train.lr'\?"):
        configure(None, ["lora"], run_overrides + ["train.learning_rate=1e-3"])
    with pytest.raises(PluginError) as error:
        configure(None, ["dora"], run_overrides)
    assert error.value.problems == ["plugin 'dora' requires plugin 'lora': add --plugin lora."]
    for missing in ("./no-such-model", str(tmp_path / "nope"), "models/x/y", "weights.gguf"):
        with pytest.raises(FtengineError, match="not found") as error:
            train(*configure(None, ["lora"], run_overrides + [f"model={missing}"]))
        assert "Repo id" not in str(error.value)


# --------------------------------------------------------------------------------------------
# 10. chat rows with an unknown role, or ending in a user turn, trained silently
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "messages, expected",
    [
        ([{"role": "user", "content": "hi"}, {"role": "assistnt", "content": "yo"}], "Did you mean 'assistant'?"),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"}],
            "ends with a 'user' turn",
        ),
    ],
)
def test_10_bad_chat_rows_are_errors_naming_file_and_line(messages, expected, run_overrides, tmp_path):
    rows = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "a", "response": "b"}, {"messages": messages}])
    with pytest.raises(DataError) as error:
        train(*configure(None, ["lora"], run_overrides + [f"data.train={rows}"]))
    assert str(error.value).startswith(f"{rows}:2:") and expected in str(error.value)
