"""QLoRA benchmark: ftengine LoRA (fp32 base) vs ftengine QLoRA vs PEFT + bitsandbytes QLoRA.

    python examples/benchmarks/bench_qlora.py [--steps 4] [--warmup 1] [--json results.json]
    python examples/benchmarks/bench_qlora.py --smoke   # the tiny test model, toy sizes: timings mean nothing

SmolLM2-135M-Instruct (the default model), one fixed batch of 8 x 128 random tokens, LoRA
r=16, alpha=32, dropout 0.05 on every linear layer but ``lm_head``, AdamW at lr 1e-4. QLoRA
is NF4, blocksize 64, double quantisation, compute dtype float32 on CPU and bfloat16 on CUDA.

Each configuration runs in a fresh subprocess so that its peak memory is its own: the
process's max RSS on CPU (``ru_maxrss``: loading included), ``torch.cuda.max_memory_allocated``
on CUDA. Step time (forward, backward, optimiser step) is the median over ``--steps`` steps
after ``--warmup`` steps; each result records the machine's 1-minute load average, since other
work on a shared machine slows the steps.

``--smoke`` runs the same three configurations on the tiny test model
(``ftengine.testing.save_tiny_model``, 64 wide, written to a temporary directory): 2 x 32 tokens, r=4,
2 steps after 1.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

CONFIGS = ("lora", "qlora", "peft-qlora")
SIZES = {"batch": 8, "seq": 128, "r": 16, "alpha": 32}
SMOKE_SIZES = {"batch": 2, "seq": 32, "r": 4, "alpha": 8}
DROPOUT, LR = 0.05, 1e-4


def build_ftengine(name, device, model_name, sizes):
    from ftengine.build import build, configure

    overrides = [
        f"model={model_name}",
        "data.train=unused.jsonl",  # build() reads no data; configure() insists on the key
        f"train.device={device.type}",
        f"lora.r={sizes['r']}",
        f"lora.alpha={sizes['alpha']}",
        f"lora.dropout={DROPOUT}",
        "lora.target_modules=all-linear",
    ]
    config, pm = configure(None, ["lora", "qlora"] if name == "qlora" else ["lora"], overrides)
    model, _, _ = build(config, pm, device=device)
    return model


def build_peft(device, model_name, sizes):
    from ftengine.plugins.hf_loader import resolve_model_path
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(model_name), quantization_config=quantization, dtype=torch.float32, device_map=device.type
    )
    lora = LoraConfig(
        r=sizes["r"], lora_alpha=sizes["alpha"], lora_dropout=DROPOUT, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    return get_peft_model(model, lora)


def measure(name, steps, warmup, model_name, sizes):
    """Build configuration ``name``, train on one batch; return its figures."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    build_model = build_peft if name == "peft-qlora" else partial(build_ftengine, name)
    model = build_model(device, model_name, sizes)
    build_s = time.perf_counter() - started
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    shape = (sizes["batch"], sizes["seq"])
    tokens = torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(0)).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    times, losses = [], []
    for _ in range(warmup + steps):
        started = time.perf_counter()
        with autocast:
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        losses.append(float(loss.detach()))
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "config": name,
        "device": device.type,
        "build_s": round(build_s, 1),
        "step_s": round(statistics.median(times[warmup:]), 2),
        "peak_mib": round(peak_mib),
        "trainable": sum(p.numel() for p in params),
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "load_avg_1m": round(os.getloadavg()[0], 2),  # other work on the machine skews the times
    }


def environment():
    import bitsandbytes
    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "python": platform.python_version(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--smoke", action="store_true", help="the tiny test model, toy sizes: timings mean nothing")
    parser.add_argument("--only", choices=CONFIGS, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--model", default="default", help=argparse.SUPPRESS)  # the child's model
    args = parser.parse_args()
    sizes = SMOKE_SIZES if args.smoke else SIZES
    if args.smoke:
        args.steps, args.warmup = 2, 1
    if args.only:
        print(json.dumps(measure(args.only, args.steps, args.warmup, args.model, sizes)))
        return

    from ftengine.plugins.hf_loader import resolve_model_path

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            from ftengine.testing import save_tiny_model

            # 64 wide: NF4 blocks of 64 must divide every input width (bitsandbytes on CPU)
            args.model = str(save_tiny_model(Path(tmp) / "tiny", hidden_size=64))
        resolve_model_path(args.model)  # fetch and convert once, outside the measured processes
        for name in CONFIGS:
            command = [sys.executable, __file__, "--only", name, "--steps", str(args.steps), "--warmup", str(args.warmup)]
            command += ["--model", args.model, *(["--smoke"] if args.smoke else [])]
            child = subprocess.run(command, capture_output=True, text=True)
            if child.returncode != 0:
                sys.exit(f"{name} failed:\n{child.stderr[-3000:]}")
            results.append(json.loads(child.stdout.strip().splitlines()[-1]))

    report = {
        "smoke": args.smoke,
        "environment": environment(),
        "setup": {
            "model": "tiny test model" if args.smoke else "SmolLM2-135M-Instruct",
            **sizes,
            "dropout": DROPOUT,
            "targets": "all linear but lm_head",
            "steps": args.steps,
            "warmup": args.warmup,
        },
        "results": results,
    }
    print(f"{'config':<12}{'step s':>8}{'peak MiB':>10}{'build s':>9}{'trainable':>11}{'loss':>17}{'load':>6}")
    for r in results:
        print(
            f"{r['config']:<12}{r['step_s']:>8.2f}{r['peak_mib']:>10}{r['build_s']:>9.1f}{r['trainable']:>11}"
            f"{r['loss_first']:>8.3f} -> {r['loss_last']:.3f}{r['load_avg_1m']:>6.1f}"
        )
    if args.smoke:
        print("(smoke run: not meaningful)")
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
