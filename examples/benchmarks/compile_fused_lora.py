"""Compile every fused_lora kernel for NVIDIA GPUs, without a GPU, and report its resources.

    python examples/benchmarks/compile_fused_lora.py                  # sm_90 (H100), every config
    python examples/benchmarks/compile_fused_lora.py --arch 80 90 --json resources.json
    python examples/benchmarks/compile_fused_lora.py --quick          # one config per kernel (CI)

Triton compiles ahead of time for a named target (``GPUTarget``) down to a cubin with the
``ptxas`` it ships, so a machine with no GPU can still prove that each kernel compiles for each
dtype, variant (LoRA, DoRA, NF4 base) and autotune config, and read off what ``ptxas`` reports: registers per
thread, spill stores and shared memory. Configs that spill or do not fit the shared memory of a
block are worth pruning; none of this measures speed.

Kernel arguments are typed by name, following the kernel module's conventions: sizes, strides
and the seed are int32, ``scale``/``p``/``keep_scale`` fp32, buffers named in ``FP32_BUFFERS``
fp32, those in ``UINT8_BUFFERS`` (the packed NF4 weight) uint8, ``INT64_BUFFERS`` int64, and
every other pointer has the activation dtype, but for ``_lora_rows`` (mixed-adapter batches),
whose adapter stacks are fp32 as ``lora`` keeps them, so its dots are fp32 (tf32). The NF4
block size is qlora's default, 64.
"""

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_fused_lora.py compiles for the GPU: unset TRITON_INTERPRET.")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning

import triton  # noqa: E402
from ftengine.plugins.fused_lora import kernel  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

DTYPES = ("bf16", "fp16", "fp32")  # Triton's names
INT_ARGS = {"T", "n", "k", "r", "T_BUCKET", "seed"}
FLOAT_ARGS = {"scale", "p", "keep_scale"}
FP32_BUFFERS = {"dS", "dB", "dbias", "dA", "GY", "M", "column_scale", "W_absmax", "W_code"}
UINT8_BUFFERS = {"W_packed"}
INT64_BUFFERS = {"adapter_of_row"}
# Buffers that are fp32 in one kernel only: the adapter stacks _lora_rows reads as lora keeps them.
KERNEL_FP32_BUFFERS = {"_lora_rows": {"A", "B", "scaling"}}
NF4_BLOCKSIZE = 64
TUNED = {"BLOCK_T", "BLOCK_N", "BLOCK_K", "GROUP_T"}
# The largest dynamic shared memory one block may use (CUDA occupancy tables), by sm version.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def kernels():
    """(name, JITFunction, autotune configs) of every autotuned kernel in the module."""
    found = []
    for name in dir(kernel):
        tuner = getattr(kernel, name)
        if isinstance(tuner, triton.runtime.autotuner.Autotuner):
            found.append((name, tuner.fn, tuner.configs))
    return found


def signature(name_of_kernel, fn, dtype, constexprs):
    fp32_buffers = FP32_BUFFERS | KERNEL_FP32_BUFFERS.get(name_of_kernel, set())
    types = {}
    for name in fn.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in INT_ARGS or name.startswith("stride"):
            types[name] = "i32"
        elif name in FLOAT_ARGS:
            types[name] = "fp32"
        elif name in UINT8_BUFFERS:
            types[name] = "*u8"
        elif name in INT64_BUFFERS:
            types[name] = "*i64"
        else:
            types[name] = "*fp32" if name in fp32_buffers else "*" + dtype
    return types


# The flag settings the plugin launches: LoRA with dropout and bias, DoRA (no dropout), and
# LoRA with dropout on an NF4 base. A kernel without a flag ignores it.
VARIANTS = {
    "lora": {"HAS_DROPOUT": True, "HAS_COLUMN_SCALE": False, "HAS_GY": False, "HAS_NF4_WEIGHT": False},
    "dora": {"HAS_DROPOUT": False, "HAS_COLUMN_SCALE": True, "HAS_GY": True, "HAS_NF4_WEIGHT": False},
    "nf4": {"HAS_DROPOUT": True, "HAS_COLUMN_SCALE": False, "HAS_GY": False, "HAS_NF4_WEIGHT": True},
}


def flag_settings(fn):
    """``{variant: flags}`` for the variants that set this kernel's HAS_* flags differently;
    flags no variant names (bias, dbias) are on."""
    flags = [name for name in fn.arg_names if name.startswith("HAS_")]
    settings = {}
    for variant, chosen in VARIANTS.items():
        setting = {flag: chosen.get(flag, True) for flag in flags}
        if setting not in settings.values():
            settings[variant] = setting
    return settings


def compile_one(name, fn, dtype, config, flags, arch, rank):
    fp32_dots = dtype == "fp32" or name in KERNEL_FP32_BUFFERS
    block_r = max(16, triton.next_power_of_2(rank))  # as kernel._common_meta
    constexprs = {
        **config.kwargs,
        **flags,
        "UPCAST": False,
        "PRECISION": "tf32" if fp32_dots else None,
        "BLOCK_R": block_r,
    }
    if "RANK_SLICES" in fn.arg_names:  # as kernel.mixed_lora_: ranks above MAX_RANK in slices
        constexprs["BLOCK_R"] = min(block_r, kernel.MAX_RANK)
        constexprs["RANK_SLICES"] = triton.cdiv(rank, constexprs["BLOCK_R"])
    if "NF4_BLOCKSIZE" in fn.arg_names:
        constexprs["NF4_BLOCKSIZE"] = NF4_BLOCKSIZE
    source = ASTSource(
        fn=fn,
        signature=signature(name, fn, dtype, constexprs),
        constexprs={(fn.arg_names.index(name),): value for name, value in constexprs.items()},
    )
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    return compiled.metadata.shared, ptxas_report(compiled.asm["ptx"], arch)


def ptxas_report(ptx, arch):
    """Registers and spill stores, from ``ptxas -v`` on the kernel's PTX."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        command = [get_ptxas(arch).path, "-v", "--gpu-name", gpu, source.name, "-o", os.devnull]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", output).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", output).group(1))
    return {"registers": registers, "spill_stores": spills}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="sm versions, e.g. 80 90")
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--rank", type=int, nargs="+", default=[16, 64], help="LoRA ranks r")
    parser.add_argument("--quick", action="store_true", help="only the first autotune config of each kernel")
    parser.add_argument("--kernel", nargs="+", help="only these kernels, e.g. _lora_rows (default: all)")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()

    rows = []
    started = time.perf_counter()
    header = f"{'kernel':<14} {'sm':>3} {'dtype':<5} {'r':>3} {'T x N x K':>11} {'w':>2} {'st':>2} {'variant':<7} "
    print(header + f"{'regs':>4} {'spill B':>7} {'shared KiB':>10}")
    chosen = [found for found in kernels() if not args.kernel or found[0] in args.kernel]
    for (name, fn, configs), arch, dtype, rank in itertools.product(chosen, args.arch, args.dtype, args.rank):
        for config in configs[:1] if args.quick else configs:
            for variant, flags in flag_settings(fn).items():
                shared, report = compile_one(name, fn, dtype, config, flags, arch, rank)
                meta = config.kwargs
                tile = f"{meta['BLOCK_T']}x{meta['BLOCK_N']}x{meta['BLOCK_K']}"
                row = {
                    "kernel": name,
                    "arch": arch,
                    "dtype": dtype,
                    "rank": rank,
                    "tile": tile,
                    "num_warps": config.num_warps,
                    "num_stages": config.num_stages,
                    "variant": variant,
                    "shared_bytes": shared,
                    **report,
                }
                row["fits"] = shared <= SHARED_LIMIT.get(arch, 48 * 1024)
                rows.append(row)
                note = "" if row["fits"] else "  too much shared memory: never launches"
                print(
                    f"{name:<14} {arch:>3} {dtype:<5} {rank:>3} {tile:>11} {config.num_warps:>2} {config.num_stages:>2} "
                    f"{variant:<7} {report['registers']:>4} {report['spill_stores']:>7} {shared / 1024:>10.1f}{note}"
                )
    spilling = sum(row["spill_stores"] > 0 for row in rows)
    print(f"{len(rows)} kernels compiled in {time.perf_counter() - started:.0f} s; {spilling} spill registers")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"triton": triton.__version__, "rows": rows}, out, indent=2)


if __name__ == "__main__":
    main()
