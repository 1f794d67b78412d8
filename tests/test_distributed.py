"""Training on several processes (real torch.distributed: gloo on CPU, 2 workers started by
``ftengine run --nproc 2``, i.e. torch.distributed.run) gives what one process gives: the same
per-step losses and gradient norms and the same trained weights, under ``ddp`` and ``fsdp``;
checkpoints move between world sizes; bad configs and refused combinations start no worker."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import pytest
import torch
from ftengine.build import configure
from ftengine.loop import train
from ftengine.testing import save_tiny_model, sft_rows, write_jsonl
from safetensors.torch import load_file
from test_dpo import preference_rows

RTOL = ATOL = 1e-5
LAUNCH_TIMEOUT = 180
PREFS = {"data": "prefs.jsonl", "evaluation": "prefs.jsonl"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The in-process reference runs use one thread, as each worker does (torchrun sets
    OMP_NUM_THREADS=1): on a small shared CPU, more threads only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    save_tiny_model(root / "model")
    save_tiny_model(root / "model64", hidden_size=64)  # qlora's blocksize must divide the widths
    # 9 rows, batch 4: the epoch's last batch has one row, so rank 1 gets none and must still take part.
    write_jsonl(root / "train.jsonl", sft_rows(9, seed=0))
    write_jsonl(root / "eval.jsonl", sft_rows(3, seed=1))
    write_jsonl(root / "prefs.jsonl", preference_rows(6))
    return root


@pytest.fixture(scope="module")
def reference(work, tmp_path_factory):
    """``reference(plugins, *opts, **where) -> output dir`` of the 1-process run with those
    plugins and ``overrides``, run once per module: the ddp and fsdp cases of a test share it."""
    runs = {}

    def run(plugins, *opts, **where):
        key = (tuple(plugins), opts, tuple(sorted(where.items())))
        if key not in runs:
            out = tmp_path_factory.mktemp("one") / "run"
            one_process(plugins, overrides(work, out, *opts, **where))
            runs[key] = out
        return runs[key]

    return run


def overrides(work, out, *extra, model="model", data="train.jsonl", evaluation="eval.jsonl"):
    return [
        f"model={work / model}",
        f"data.train={work / data}",
        f"data.eval={work / evaluation}",
        f"output_dir={out}",
        "train.max_steps=3",
        "train.batch_size=4",
        "train.grad_accum=2",
        "train.lr=1e-2",
        *extra,
    ]


def command(plugins, opts, *extra, nproc=2):
    args = [sys.executable, "-m", "ftengine.cli", "run"]
    for plugin in plugins:
        args += ["--plugin", plugin]
    for item in opts:
        args += ["-o", item]
    return [*args, "--nproc", str(nproc), *extra]


def launch(plugins, opts, *extra, check=True):
    result = subprocess.run(command(plugins, opts, *extra), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@contextmanager
def launched(plugins, opts, *extra):
    """``ftengine run --nproc 2`` running in the background during the block, then waited for
    (exit status 0). The launcher and torchrun start on one core: a 1-process run in the block
    uses the other, instead of waiting before or after. Output goes to a file, not a pipe that
    could fill while nobody reads it."""
    with tempfile.TemporaryFile("w+") as output:
        child = subprocess.Popen(command(plugins, opts, *extra), stdout=output, stderr=subprocess.STDOUT, text=True)
        try:
            yield
            child.wait(LAUNCH_TIMEOUT)
        finally:
            if child.poll() is None:  # the block failed or the run hangs: torchrun stops its workers on SIGTERM
                child.terminate()
                child.wait(60)
        output.seek(0)
        assert child.returncode == 0, output.read()[-3000:]


def one_process(plugins, opts, resume=False):
    config, pm = configure(None, plugins, opts)
    return train(config, pm, resume=resume)


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(one, other, weights="adapter_model.safetensors", weight_atol=ATOL, rtol=RTOL):
    steps_a = {r["step"]: r for r in records(one) if "loss" in r}
    logged = [r["step"] for r in records(other) if "loss" in r]
    assert len(logged) == len(set(logged)), "a step was logged twice"
    steps_b = {r["step"]: r for r in records(other) if "loss" in r}
    assert sorted(steps_a) == sorted(steps_b)
    for step, x in steps_a.items():
        for key in ("loss", "grad_norm"):
            assert steps_b[step][key] == pytest.approx(x[key], rel=rtol, abs=0), (step, key)
    assert records(other)[-1]["eval_loss"] == pytest.approx(records(one)[-1]["eval_loss"], rel=rtol, abs=0)
    ta, tb = load_file(one / "final" / weights), load_file(other / "final" / weights)
    assert ta.keys() == tb.keys()
    for name in ta:
        torch.testing.assert_close(tb[name], ta[name], rtol=rtol, atol=weight_atol, msg=name)


# --------------------------------------------------------------------------------------------
# the same run on one and on two processes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_lora_on_two_processes_equals_one(work, tmp_path, reference, parallel):
    """Rows of different lengths, a train set of 9 (not divisible by 2, nor by the batch of 4),
    grad_accum 2: the same losses, gradient norms and adapter."""
    opts = ["lora.dropout=0", "lora.r=4"]
    with launched(["lora", parallel], overrides(work, tmp_path / "two", *opts)):
        one = reference(["lora"], *opts)
    assert_same_run(one, tmp_path / "two")
    assert [p.name for p in (tmp_path / "two").glob("final*")] == ["final"]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "model"), tmp_path / "two" / "final")
    assert any("lora_A" in name for name, _ in peft_model.named_parameters())


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_full_fine_tuning_on_two_processes_equals_one(work, tmp_path, reference, parallel):
    with launched(["full", parallel], overrides(work, tmp_path / "two", "train.lr=1e-3")):
        one = reference(["full"], "train.lr=1e-3")
    assert_same_run(one, tmp_path / "two", weights="model.safetensors")


@pytest.mark.parametrize("cached", [False, True], ids=["adapters-off-reference", "cached-reference"])
def test_dpo_under_ddp_equals_one_process(work, tmp_path, reference, cached):
    opts = ["lora.dropout=0", "train.batch_size=2", f"dpo.precompute_ref={str(cached).lower()}"]
    with launched(["lora", "dpo", "ddp"], overrides(work, tmp_path / "two", *opts, **PREFS)):
        one = reference(["lora", "dpo"], *opts, **PREFS)
    # Rows padded to other lengths round differently (~1e-7); Adam divides a gradient by its own
    # size, so the odd element whose gradient is that rounding noise moves by up to ~lr * 1e-3.
    # Measured: 1 or 2 elements of ~10k differ by 3e-5, the rest by under 2e-7.
    assert_same_run(one, tmp_path / "two", weight_atol=1e-4)
    metrics = records(tmp_path / "two")[0]
    assert "reward_accuracy" in metrics


def test_dpo_with_full_fine_tuning_under_ddp_equals_one_process(work, tmp_path, reference):
    """No adapter to switch off: the reference is a frozen copy of the model, made on every rank
    when training starts (fsdp refuses this combination: a sharded model cannot be copied)."""
    opts = ["train.lr=1e-3", "train.batch_size=2"]
    with launched(["full", "dpo", "ddp"], overrides(work, tmp_path / "two", *opts, **PREFS)):
        one = reference(["full", "dpo"], *opts, **PREFS)
    assert_same_run(one, tmp_path / "two", weights="model.safetensors")
    assert "reward_accuracy" in records(tmp_path / "two")[0]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_prompt_tuning_on_two_processes_equals_one(work, tmp_path, reference, parallel):
    """Under fsdp the virtual tokens are in the root unit, sharded like the embeddings."""
    opts = ["prompt_tuning.num_virtual_tokens=4"]
    with launched(["prompt_tuning", parallel], overrides(work, tmp_path / "two", *opts)):
        one = reference(["prompt_tuning"], *opts)
    assert_same_run(one, tmp_path / "two")


def test_dora_under_ddp_equals_one_process(work, tmp_path, reference):
    opts = ["lora.dropout=0", "lora.r=4"]
    with launched(["lora", "dora", "ddp"], overrides(work, tmp_path / "two", *opts)):
        one = reference(["lora", "dora"], *opts)
    assert_same_run(one, tmp_path / "two")


def test_dpo_with_dora_under_fsdp_equals_one_process(work, tmp_path, reference):
    """One launch for two compositions: DoRA under fsdp (its magnitude and the base weight it
    normalises are in the same unit) and DPO under fsdp (the reference is the same sharded model
    with the adapters off)."""
    opts = ["lora.dropout=0", "lora.r=4", "train.batch_size=2"]
    with launched(["lora", "dora", "dpo", "fsdp"], overrides(work, tmp_path / "two", *opts, **PREFS)):
        one = reference(["lora", "dora", "dpo"], *opts, **PREFS)
    # As under ddp above: rounding noise that Adam scales up in the odd element.
    assert_same_run(one, tmp_path / "two", weight_atol=1e-4)
    assert "reward_accuracy" in records(tmp_path / "two")[0]


def test_qlora_under_ddp_equals_one_process(work, tmp_path, reference):
    opts = ["lora.dropout=0", "lora.r=4", "qlora.blocksize=64"]
    with launched(["lora", "qlora", "ddp"], overrides(work, tmp_path / "two", *opts, model="model64")):
        one = reference(["lora", "qlora"], *opts, model="model64")
    # Losses and gradient norms agree to 1e-7 here, but Adam divides by the root of tiny second
    # moments: an adapter element whose gradient is near zero moved 2.7e-5 apart on a Xeon.
    assert_same_run(one, tmp_path / "two", weight_atol=1e-4)


# --------------------------------------------------------------------------------------------
# checkpoints move between world sizes
# --------------------------------------------------------------------------------------------


def test_fsdp_checkpoint_resumes_on_one_process_and_back(work, tmp_path):
    """A checkpoint holds whole tensors (optimiser state too) whatever the world size. A
    constant learning rate (min_lr_ratio 1) lets a 2-step run be extended to 4 exactly."""
    opts = ["lora.dropout=0", "lora.r=4", "train.min_lr_ratio=1", "train.save_every=2", "train.grad_accum=1"]

    def at(out, steps):
        return [*overrides(work, out, *opts), f"train.max_steps={steps}"]

    # saved on 2 (fsdp), resumed on 1; saved on 1, resumed on 2 (fsdp). Each 1-process run
    # that the next launch does not need runs beside the launch before it.
    one_process(["lora"], at(tmp_path / "one-then-two", 2))
    with launched(["lora", "fsdp"], at(tmp_path / "two-then-one", 2)):
        one_process(["lora"], at(tmp_path / "straight", 4))
    with launched(["lora", "fsdp"], at(tmp_path / "one-then-two", 4), "--resume"):
        one_process(["lora"], at(tmp_path / "two-then-one", 4), resume=True)
    assert_same_run(tmp_path / "straight", tmp_path / "two-then-one")
    assert_same_run(tmp_path / "straight", tmp_path / "one-then-two")


def test_sigterm_to_the_launcher_checkpoints_every_worker_and_the_run_resumes(work, tmp_path):
    """SIGTERM to ``ftengine run --nproc 2`` reaches both workers; they stop after the same
    step with one checkpoint. Resumed on 2 processes, the run ends exactly where an
    uninterrupted 2-process run does; resumed on 1, where that run does to rounding."""
    # A constant learning rate (min_lr_ratio 1): the schedule does not depend on the total.
    opts = ["lora.dropout=0", "lora.r=4", "train.grad_accum=1", "train.batch_size=2", "train.min_lr_ratio=1"]
    out = tmp_path / "two"
    launcher = subprocess.Popen(
        command(["lora", "ddp"], [*overrides(work, out, *opts), "train.max_steps=400"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + LAUNCH_TIMEOUT
    while time.time() < deadline and (not (out / "metrics.jsonl").is_file() or len(records(out)) < 3):
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)
    # torchrun SIGKILLs a worker still running 30 s after its SIGTERM. On a starved machine that
    # happened once after the checkpoint was written (the exit was slow): 61 s in all.
    _, stderr = launcher.communicate(timeout=LAUNCH_TIMEOUT)
    assert launcher.returncode != 0
    assert not (out / "final").exists(), stderr[-3000:]  # the signal was not lost: the run did not go on to the end
    assert (out / "checkpoints").is_dir(), stderr[-3000:]
    saved = sorted((out / "checkpoints").iterdir())
    assert saved, stderr[-3000:]
    stopped_at = json.loads((saved[-1] / "state.json").read_text())["step"]
    assert 3 <= stopped_at < 400
    assert stderr.count("continue with:") == 1  # rank 0 alone says how to resume

    total = [f"train.max_steps={stopped_at + 2}"]
    shutil.copytree(out, tmp_path / "one")
    with launched(["lora", "ddp"], [*overrides(work, tmp_path / "straight", *opts), *total]):
        one_process(["lora"], [*overrides(work, tmp_path / "one", *opts), *total], resume=True)
    launch(["lora", "ddp"], [*overrides(work, out, *opts), *total], "--resume")
    # Same world size, same shares, same reduction order: bitwise the same run.
    assert_same_run(tmp_path / "straight", out, rtol=0, weight_atol=0)
    # On 1 process only the 2 steps after the checkpoint are computed differently (by rounding,
    # as in the tests above); the steps before it are the 2-process run's own records.
    assert_same_run(tmp_path / "straight", tmp_path / "one")


def test_a_signal_reaching_a_rank_while_the_ranks_agree_whether_to_stop_still_stops_the_run(work, tmp_path):
    """After each step the ranks agree, in a collective, whether any was signalled. A SIGTERM
    that reaches a rank in that collective, after its own "no" went in, counts at the next
    step: the run stops after step 4 with a checkpoint. (It used to be overwritten by the
    agreed "no": when the signal sent to every rank landed there on both, the run trained on to
    the end, or to torchrun's SIGKILL, with no checkpoint.)"""
    opts = ["lora.dropout=0", "lora.r=4", "train.grad_accum=1"]
    out = tmp_path / "out"
    env = {**os.environ, "FTENGINE_TEST_SIGNAL_AT_STEP": "3", "PYTHONPATH": os.path.dirname(__file__)}
    result = subprocess.run(
        command(["lora", "ddp", "sample_plugins.late_signal"], [*overrides(work, out, *opts), "train.max_steps=8"]),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
        env=env,
    )
    assert result.returncode != 0
    assert not (out / "final").exists(), result.stderr[-3000:]
    saved = sorted((out / "checkpoints").iterdir())
    # 3 only if rank 0 stalled over 1 s before reaching the collective (then the signal came first).
    assert [json.loads((path / "state.json").read_text())["step"] for path in saved] in ([4], [3])
    assert result.stderr.count("continue with:") == 1


def test_a_worker_killed_mid_run_fails_the_job_naming_its_rank_and_the_checkpoint_resumes(work, tmp_path):
    """Rank 1 is SIGKILLed after step 3 (checkpoints every 2 steps): torchrun stops rank 0,
    which waits in a collective for it, and exits non-zero well within the timeout, naming the
    rank; the step-2 checkpoint resumes on 1 process."""
    opts = ["lora.dropout=0", "lora.r=4", "train.grad_accum=1", "train.save_every=2"]
    out = tmp_path / "out"
    env = {**os.environ, "FTENGINE_TEST_DIE_AT_STEP": "3", "PYTHONPATH": os.path.dirname(__file__)}
    started = time.time()
    result = subprocess.run(
        command(["lora", "ddp", "sample_plugins.die"], [*overrides(work, out, *opts), "train.max_steps=6"]),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
        env=env,
    )
    assert result.returncode != 0
    assert time.time() - started < LAUNCH_TIMEOUT / 2
    output = result.stdout + result.stderr
    assert "local_rank: 1" in output and "Signal 9 (SIGKILL)" in output, output[-3000:]
    saved = sorted((out / "checkpoints").iterdir())
    assert [json.loads((path / "state.json").read_text())["step"] for path in saved] == [2]
    assert not (out / "final").exists()

    # The same plugin set (a resume keeps it); without the variable the plugin does nothing.
    one_process(["lora", "sample_plugins.die"], [*overrides(work, out, *opts), "train.max_steps=4"], resume=True)
    steps = [r["step"] for r in records(out) if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert (out / "final" / "adapter_model.safetensors").is_file()


# --------------------------------------------------------------------------------------------
# refused before any worker starts
# --------------------------------------------------------------------------------------------


def _started_no_worker(result, out):
    assert "torch.distributed.run" not in result.stderr and "OMP_NUM_THREADS" not in result.stderr
    assert not out.exists()


def test_a_config_error_is_printed_once_and_starts_no_worker(work, tmp_path):
    out = tmp_path / "out"
    result = launch(["lora", "ddp"], [*overrides(work, out), "train.lr=-1", "lora.rank=3"], check=False)
    assert result.returncode == 2
    assert result.stderr.count("greater than 0") == 1 and result.stderr.count("Did you mean 'lora.r'") == 1
    assert result.stderr.count("configuration problem") == 1
    _started_no_worker(result, out)


def test_qlora_with_fsdp_is_refused_with_the_reason(work, tmp_path):
    out = tmp_path / "out"
    result = launch(["lora", "qlora", "fsdp"], overrides(work, out, model="model64"), check=False)
    assert result.returncode == 2
    assert "plugins 'qlora' and 'fsdp'" in result.stderr and "which FSDP2 cannot shard" in result.stderr
    assert "--plugin ddp" in result.stderr
    _started_no_worker(result, out)


def test_dpo_of_a_full_fine_tune_under_a_sharding_plugin_is_refused_before_the_model_loads(work, tmp_path):
    from ftengine.build import configure
    from ftengine.errors import FtengineError

    with pytest.raises(FtengineError) as refused:
        configure(None, ["full", "dpo", "fsdp"], overrides(work, tmp_path / "out"), world_size=2)
    assert "plugins 'dpo', 'full' and 'fsdp'" in str(refused.value) and "--plugin ddp" in str(refused.value)


def test_two_processes_without_a_parallel_plugin_are_refused(work, tmp_path):
    out = tmp_path / "out"
    result = launch(["lora"], overrides(work, out), check=False)
    assert result.returncode == 2
    assert "--plugin ddp" in result.stderr and "--plugin fsdp" in result.stderr
    _started_no_worker(result, out)


def test_run_help_lists_the_launch_flags():
    from click.testing import CliRunner
    from ftengine.cli import cli

    output = CliRunner().invoke(cli, ["run", "--help"]).output
    for flag in ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint"):
        assert flag in output


def test_the_worker_entry_point_is_the_cli_module():
    """``torchrun -m ftengine.cli run ...`` works: the module runs the CLI."""
    result = subprocess.run([sys.executable, "-m", "ftengine.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "run" in result.stdout
    assert os.environ.get("WORLD_SIZE") is None  # the tests themselves are one process


def test_the_distributed_benchmark_runs(tmp_path):
    """``bench_distributed.py --smoke``: 1 process and 2 under fsdp, each measuring itself."""
    bench = os.path.join(os.path.dirname(__file__), "..", "examples", "benchmarks", "bench_distributed.py")
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, bench, "--smoke", "--out", str(out)], capture_output=True, text=True, timeout=2 * LAUNCH_TIMEOUT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(smoke run: not meaningful)" in result.stdout
    one, fsdp = json.loads(out.read_text())["results"]
    assert [len(one["ranks"]), len(fsdp["ranks"])] == [1, 2]
    for rank in one["ranks"] + fsdp["ranks"]:
        assert rank["tokens_per_s"] > 0 and rank["peak_rss_mib"] > 0 and rank["optimizer_state_bytes"] > 0
    # each rank holds about half of every parameter and of the optimiser state (a dimension that
    # 2 does not divide leaves rank 0 one row more)
    for key in ("param_bytes", "optimizer_state_bytes"):
        whole, shards = one["ranks"][0][key], [rank[key] for rank in fsdp["ranks"]]
        assert whole <= sum(shards) < 1.01 * whole and max(shards) < 0.51 * whole, (key, whole, shards)
