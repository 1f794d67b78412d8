"""Training on 1 and 2 processes on this machine's CPU: throughput, peak memory and, for FSDP
against DDP, the bytes of parameters and optimiser state each rank holds.

    python examples/benchmarks/bench_distributed.py [--steps 20] [--method lora|full] [--model PATH|default] [--out r.json]
    python examples/benchmarks/bench_distributed.py --smoke      # toy size, 2 configurations (tests/test_distributed.py)

Each configuration is a real ``ftengine run`` in child processes (gloo on CPU):

* ``1 proc x 1 thread`` and ``1 proc x 2 threads``: one process, ``OMP_NUM_THREADS`` 1 or 2;
* ``2 procs x 1 thread, ddp`` and ``... fsdp``: ``ftengine run --nproc 2`` (torchrun gives each
  worker one thread).

This file is also the plugin (``--plugin benchmarks.bench_distributed``, with ``examples/`` on ``PYTHONPATH``) that each worker loads to measure
itself: the time and ``tokens_seen`` at the end of step 1 and at the end of training (so
tokens/s leaves out loading and the first step), ``ru_maxrss`` (peak resident memory, loading
included), and the bytes of the parameters and of the optimiser state this rank holds (a
DTensor counts its local shard). tokens/s is the job's (every rank's tokens, per wall second).

The model is the tiny test model (``ftengine.testing.save_tiny_model``) unless ``--model``
names another (``--model default`` is SmolLM2-135M-Instruct); the data is synthetic
(``ftengine.testing.sft_rows``).
"""

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from ftengine import hookimpl

HERE = Path(__file__).resolve().parent
CONFIGS = [
    # (name, processes, threads per process, parallel plugin)
    ("1 proc x 1 thread", 1, 1, None),
    ("1 proc x 2 threads", 1, 2, None),
    ("2 procs x 1 thread, ddp", 2, 1, "ddp"),
    ("2 procs x 1 thread, fsdp", 2, 1, "fsdp"),
]
SMOKE_CONFIGS = ("1 proc x 1 thread", "2 procs x 1 thread, fsdp")

# ---------------------------------------------------------------------------------------------
# the plugin each worker loads
# ---------------------------------------------------------------------------------------------

_marks = {}


def _local_bytes(tensor):
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


@hookimpl
def ftengine_on_step_end(state):
    if state.step == 1:
        _marks["t1"], _marks["tokens1"] = time.perf_counter(), state.tokens_seen


@hookimpl
def ftengine_on_train_end(model, state):
    elapsed = time.perf_counter() - _marks["t1"]
    optimizers = [o for o in gc.get_objects() if isinstance(o, torch.optim.Optimizer)]
    optimizer_bytes = sum(
        _local_bytes(value)
        for o in optimizers
        for values in o.state.values()
        for value in values.values()
        if torch.is_tensor(value)
    )
    result = {
        "rank": state.world.rank,
        "world_size": state.world.size,
        "threads": torch.get_num_threads(),
        "steps_timed": state.step - 1,
        "tokens_per_s": (state.tokens_seen - _marks["tokens1"]) / elapsed,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "param_bytes": sum(_local_bytes(p) for p in model.parameters()),
        "trainable_param_bytes": sum(_local_bytes(p) for p in model.parameters() if p.requires_grad),
        "optimizer_state_bytes": optimizer_bytes,
    }
    out = Path(os.environ["BENCH_DISTRIBUTED_OUT"])
    (out / f"rank{state.world.rank}.json").write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------


def run_config(name, nproc, threads, parallel, opts, method, root):
    out = root / name.replace(" ", "_").replace(",", "")
    stats = out / "stats"
    stats.mkdir(parents=True)
    plugins = (["lora"] if method == "lora" else ["full"]) + ([parallel] if parallel else []) + ["benchmarks.bench_distributed"]
    command = [sys.executable, "-m", "ftengine.cli", "run", *[a for p in plugins for a in ("--plugin", p)]]
    command += [a for o in [*opts, f"output_dir={out / 'run'}"] for a in ("-o", o)]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "BENCH_DISTRIBUTED_OUT": str(stats),
        "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    }
    started = time.perf_counter()
    child = subprocess.run(command, capture_output=True, text=True, env=env)
    if child.returncode != 0:
        sys.exit(f"{name}: ftengine run failed\n{child.stderr[-3000:]}")
    ranks = [json.loads((stats / f"rank{r}.json").read_text()) for r in range(nproc)]
    return {"config": name, "processes": nproc, "threads": threads, "wall_s": time.perf_counter() - started, "ranks": ranks}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    parser.add_argument(
        "--model", help="a model dir, hub id, .gguf or 'default' (SmolLM2-135M-Instruct); default: the tiny test model"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="3 steps, 2 configurations: proves the script runs; timings mean nothing"
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.rows = 3, 16

    from ftengine.testing import save_tiny_model, sft_rows, write_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = args.model or str(save_tiny_model(root / "tiny"))
        write_jsonl(root / "train.jsonl", sft_rows(args.rows, seed=0))
        opts = [
            f"model={model}",
            f"data.train={root / 'train.jsonl'}",
            f"train.max_steps={args.steps}",
            f"train.batch_size={args.batch_size}",
            f"train.max_length={args.max_length}",
            "train.grad_accum=1",
        ]
        if args.method == "lora":
            opts.append("lora.dropout=0")
        configs = [c for c in CONFIGS if not args.smoke or c[0] in SMOKE_CONFIGS]
        results = [run_config(*config, opts, args.method, root) for config in configs]

    report = {
        "smoke": args.smoke,
        "model": args.model or "tiny test model",
        "method": args.method,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "load_average_after": os.getloadavg(),
        },
        "results": results,
    }
    print(f"{args.method}, {report['model']}, {args.steps} steps of {args.batch_size} x <= {args.max_length} tokens")
    print(f"{'configuration':<26} {'tokens/s':>9} {'peak RSS MiB/proc':>18} {'param KiB/rank':>15} {'optim KiB/rank':>15}")
    for result in results:
        ranks = result["ranks"]

        def per_rank(key, scale=1):
            return " / ".join(f"{r[key] / scale:.0f}" for r in ranks)  # noqa: B023 (used at once)

        print(
            f"{result['config']:<26} {ranks[0]['tokens_per_s']:>9.0f} {per_rank('peak_rss_mib'):>18} "
            f"{per_rank('param_bytes', 1024):>15} {per_rank('optimizer_state_bytes', 1024):>15}"
        )
    if args.smoke:
        print("(smoke run: not meaningful)")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
