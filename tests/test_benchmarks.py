"""The benchmarks cannot rot unseen: each script's ``--smoke`` mode runs every code path at toy
sizes on the CPU (the GPU kernels through Triton's interpreter), on the tiny test model, and the
JSON it writes shows every side it compares ran (the timings it prints mean nothing here).

``bench_distributed.py`` and ``bench_serving.py`` are run by ``tests/test_distributed.py`` and
``tests/test_server.py``, beside the code they measure."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,  # find, not import: the benchmarks run it in children
    reason="the fused_lora kernels are written in Triton, which is not installed",
)

BENCHMARKS = Path(__file__).parent.parent / "examples" / "benchmarks"
BENCH_FUSED_LORA = BENCHMARKS / "bench_fused_lora.py"
BF16_TOLERANCE = 3e-2  # a few bf16 roundings, relative to the largest output
SAME_START = 1e-3  # one model, the same batches and B = 0 at init: the first losses agree


def run_bench(tmp_path, *args, script=BENCH_FUSED_LORA, out_flag="--out"):
    out = tmp_path / "result.json"
    command = [sys.executable, str(script), "--smoke", out_flag, str(out), *args]
    child = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    return json.loads(out.read_text()), child


@needs_triton
def test_fused_lora_layer_benchmark_runs_and_agrees_with_eager(tmp_path):
    result, child = run_bench(tmp_path)
    assert result["smoke"] and result["environment"]["torch"]
    rows = result["layer"]
    assert {(row["r"], row["dropout"]) for row in rows} == {(4, 0.0), (4, 0.1), (16, 0.0), (16, 0.1)}
    for row in rows:
        assert all(row[f"{name}_ms"] > 0 for name in ("base", "peft", "eager", "fused"))
        if row["dropout"] == 0:
            assert row["max_rel_diff_fused_vs_eager"] < BF16_TOLERANCE
            assert row["max_rel_diff_peft_vs_eager"] < BF16_TOLERANCE
    assert "vs peft" in child.stdout
    assert [goal["goal"][:5] for goal in result["goals"]] == ["fused", "PEFT "]
    assert "goal: PEFT / fused" in child.stdout and "(smoke run: not meaningful)" in child.stdout


@needs_triton
@pytest.mark.parametrize("variant", ["lora", "dora", "qlora"])
def test_fused_lora_end_to_end_benchmark_runs_all_three_setups(tmp_path, variant):
    result, child = run_bench(tmp_path, "--e2e", "--variant", variant)
    rows = {row["setup"]: row for row in result["e2e"]}
    assert set(rows) == {"peft", "lora", "lora+fused_lora"}
    assert {row["variant"] for row in rows.values()} == {variant}
    assert "14 layers fused, 0 fell back" in child.stderr  # the fused setup really is fused
    # One random model and batch, and B = 0 at init: every setup starts from the same loss.
    first = [row["loss_first"] for row in rows.values()]
    assert max(first) - min(first) < 1e-2
    assert all(row["tokens_per_s"] > 0 and row["trainable"] == rows["peft"]["trainable"] for row in rows.values())
    assert "goal: tokens/s" in child.stdout and len(result["goals"]) == 1
    assert (result["goals"][0]["met"] is None) == (variant != "lora")  # the issue sets a goal for LoRA only


@needs_triton
def test_every_fused_lora_kernel_compiles_for_the_h100(tmp_path):
    """The interpreter does not catch what only the GPU compiler rejects; Triton compiles for a
    named target without a GPU, down to a cubin through its own ptxas. Every kernel, in each
    variant the plugin launches (LoRA, DoRA, NF4 base)."""
    out = tmp_path / "resources.json"
    script = BENCH_FUSED_LORA.parent / "compile_fused_lora.py"
    command = [sys.executable, str(script), "--quick", "--arch", "90", "--dtype", "bf16", "fp32", "--rank", "64"]
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    child = subprocess.run([*command, "--json", str(out)], capture_output=True, text=True, timeout=900, env=env)
    assert child.returncode == 0, child.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    kernels = {row["kernel"] for row in rows}
    assert {"_lora_down", "_lora_fwd", "_lora_grad_sb", "_lora_grad_a", "_lora_grad_x", "_lora_rows"} <= kernels
    compiled = {(row["kernel"], row["variant"], row["dtype"]) for row in rows}
    for dtype in ("bf16", "fp32"):
        assert {(kernel, "lora", dtype) for kernel in kernels} <= compiled
        assert {("_lora_fwd", "dora", dtype), ("_lora_fwd", "nf4", dtype), ("_lora_grad_x", "nf4", dtype)} <= compiled
        assert ("_lora_rows", "dora", dtype) in compiled
    assert all(row["registers"] > 0 for row in rows)


def test_1_lora_benchmark_runs_ftengine_and_peft_on_the_same_batches(tmp_path):
    """Its PEFT side stopped at 'no active plugin trains anything': it read its config as a
    training job without a method plugin, since PEFT trains there."""
    result, child = run_bench(tmp_path, script=BENCHMARKS / "bench_lora.py")
    assert result["smoke"] and set(result["results"]) == {"ftengine", "peft"}
    for side in result["results"].values():
        assert len(side["step_times"]) == len(side["losses"]) == 3
        assert all(t > 0 for t in side["step_times"]) and side["peak_memory_mb"] > 0
    first = [side["losses"][0] for side in result["results"].values()]
    assert max(first) - min(first) < SAME_START, first
    assert result["step_time_ratio"] > 0 and result["peak_memory_ratio"] > 0
    assert "(smoke run: not meaningful)" in child.stdout


def test_2_qlora_benchmark_runs_ftengine_lora_qlora_and_peft_qlora(tmp_path):
    result, child = run_bench(tmp_path, script=BENCHMARKS / "bench_qlora.py", out_flag="--json")
    rows = {row["config"]: row for row in result["results"]}
    assert result["smoke"] and set(rows) == {"lora", "qlora", "peft-qlora"}
    assert len({row["trainable"] for row in rows.values()}) == 1  # the same adapters everywhere
    for row in rows.values():
        assert row["step_s"] >= 0 and row["peak_mib"] > 0 and row["loss_last"] < row["loss_first"], row
    # the same NF4 quantisation of the same model on both sides: the same first loss
    assert abs(rows["qlora"]["loss_first"] - rows["peft-qlora"]["loss_first"]) < SAME_START
    assert "(smoke run: not meaningful)" in child.stdout


def test_3_sft_benchmark_runs_ftengine_and_trl_packed_and_padded(tmp_path):
    """A setup that failed was printed and skipped, and the run still exited 0."""
    result, child = run_bench(tmp_path, script=BENCHMARKS / "bench_sft.py")
    runs = result["results"]
    assert result["smoke"] and result["failed"] == []
    assert set(runs) == {"ftengine packed", "ftengine padded", "trl packed", "trl padded"}
    assert all(run["steps"] > 0 and run["target_tokens_per_s"] > 0 and run["peak_rss_mb"] > 0 for run in runs.values())
    assert len({run["target_tokens"] for run in runs.values()}) == 1, runs  # every setup learns the same answers
    assert result["ratio_best"] > 0 and "(smoke run: not meaningful)" in child.stdout


@pytest.mark.parametrize("mode", [["--versus-trl", "1", "--bf16"], ["--packed-vs-padded", "1"]])
def test_3_sft_benchmark_alternating_modes_run(mode):
    command = [sys.executable, str(BENCHMARKS / "bench_sft.py"), "--smoke", *mode]
    child = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    sides = re.findall(r"^(ftengine|trl) (packed|padded).*: (\d+) batches, (\d+) (?:target )?tokens", child.stdout, re.M)
    assert len(sides) == 2 and sides[0][3] == sides[1][3], child.stdout  # both sides see the same tokens
    assert "median pass time ratio" in child.stdout and "(smoke run: not meaningful)" in child.stdout


def test_4_grpo_benchmark_runs_ftengine_and_trl_on_the_same_prompts(tmp_path, capsys):
    """In this process (its children still import TRL, the bulk of its cost): both sides take
    every step, generate no more than the group and length allow, and report their memory."""
    spec = importlib.util.spec_from_file_location("bench_grpo", BENCHMARKS / "bench_grpo.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--smoke", "--out", str(tmp_path / "grpo.json")])
    result = json.loads((tmp_path / "grpo.json").read_text())
    sizes = result["sizes"]
    assert result["smoke"] and result["failed"] == [] and set(result["results"]) == {"ftengine", "trl"}
    most_tokens = sizes["prompts"] * sizes["generations"] * sizes["completion-length"]
    for side in result["results"].values():
        assert side["steps"] == len(side["rewards"]) == len(side["completion_tokens"]) == len(side["step_cpu_times"])
        assert side["steps"] == sizes["steps"], side
        assert all(0 < tokens <= most_tokens for tokens in side["completion_tokens"]), side
        assert side["median_step_s"] > 0 and side["median_step_cpu_s"] > 0 and side["peak_rss_mb"] >= side["loaded_rss_mb"] > 0
    assert all(ratio > 0 for ratio in result["ratios_trl_over_ftengine"].values())
    assert "(smoke run: not meaningful)" in capsys.readouterr().out
