"""LoRA training step: ftengine vs PEFT on SmolLM2-135M-Instruct, same batches, one command.

    python examples/benchmarks/bench_lora.py [--steps 8] [--warmup 2] [--out results.json]
    python examples/benchmarks/bench_lora.py --smoke    # the tiny test model, toy sizes: timings mean nothing

Each configuration runs in its own child process so its peak memory is its own (max RSS on
CPU, ``torch.cuda.max_memory_allocated`` on CUDA):

* ``ftengine``: the real training loop (``ftengine.loop.train``) with ``--plugin lora``;
  step times come from its ``metrics.jsonl``.
* ``peft``: ``peft.get_peft_model`` with the same LoRA config, and a plain loop doing what the
  core loop does (summed token loss / target count, clipping, AdamW) on the same batches.

Config: LoRA r=16, alpha=32, dropout 0.05, all linear layers but the head; batch 8 sequences
truncated to 128 tokens from the contacts task; AdamW lr 1e-4; fp32 on CPU, bf16 autocast on
CUDA. Reports the median step time after ``--warmup`` steps and the ratio ftengine / PEFT, and
each side's first and last loss: one model, the same batches and B = 0 at init, so both sides
start from the same loss.

``--smoke`` runs the same code on the tiny test model (``ftengine.testing.save_tiny_model``,
written to a temporary directory) with r=4, batches of 2 x 512 tokens (its tokenizer spells
bytes) and 3 steps.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SIZES = {"r": 16, "alpha": 32, "batch": 8, "max_length": 128}
SMOKE_SIZES = {"r": 4, "alpha": 8, "batch": 2, "max_length": 512}  # the tiny tokenizer spells bytes: long rows
DROPOUT, LR = 0.05, 1e-4


def contacts_train_file():
    from ftengine.plugins.hf_loader import cache_dir
    from ftengine_contacts.task import write_splits

    data_dir = cache_dir() / "data" / "contacts-v1"
    if not (data_dir / "train.jsonl").is_file():
        write_splits(data_dir)
    return data_dir / "train.jsonl"


def peak_memory_mb():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_ftengine(steps, model_name, sizes):
    from ftengine.build import configure
    from ftengine.loop import train

    with tempfile.TemporaryDirectory() as out:
        overrides = [
            f"model={model_name}",
            f"output_dir={out}",
            f"data.train={contacts_train_file()}",
            f"train.max_steps={steps}",
            f"train.batch_size={sizes['batch']}",
            f"train.max_length={sizes['max_length']}",
            f"train.lr={LR}",
            f"lora.r={sizes['r']}",
            f"lora.alpha={sizes['alpha']}",
            f"lora.dropout={DROPOUT}",
        ]
        config, pm = configure(None, ["lora", "no:progress"], overrides)
        train(config, pm)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    step_records = [r for r in records if "step_time_s" in r]
    return [r["step_time_s"] for r in step_records], [r["loss"] for r in step_records]


def run_peft(steps, model_name, sizes):
    from ftengine.build import configure
    from ftengine.data import collate_sft, load_sft_file
    from ftengine.loop import micro_batch
    from ftengine.plugins.hf_loader import load_pretrained
    from ftengine.plugins.sft import token_nll_sum
    from ftengine.state import Datasets
    from peft import LoraConfig, get_peft_model

    # Only for the batch order ftengine's loop uses: PEFT trains here, no ftengine method plugin,
    # so the config is read as for a job that trains nothing (configure would refuse it otherwise).
    overrides = [f"data.train={contacts_train_file()}", f"train.batch_size={sizes['batch']}"]
    config, _ = configure(None, [], overrides, require_data=False)
    model, tokenizer = load_pretrained(model_name)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lora = LoraConfig(
        r=sizes["r"], lora_alpha=sizes["alpha"], lora_dropout=DROPOUT, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora).to(device).train()
    examples, _ = load_sft_file(config.data.train, tokenizer, sizes["max_length"])
    datasets = Datasets(train=examples, eval=[], collate=lambda e: collate_sft(e, tokenizer.pad_token_id))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    times, losses = [], []
    for step in range(steps):
        started = time.perf_counter()
        _, batch = micro_batch(datasets, config, step)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, count = token_nll_sum(logits[:, :-1], batch["labels"][:, 1:])
        (loss / count).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        losses.append(float(loss.detach() / count))
    return times, losses


def child(name, steps, model_name, sizes):
    torch.manual_seed(0)
    times, losses = {"ftengine": run_ftengine, "peft": run_peft}[name](steps, model_name, sizes)
    print(json.dumps({"name": name, "step_times": times, "losses": losses, "peak_memory_mb": peak_memory_mb()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="the tiny test model, toy sizes, 3 steps: timings mean nothing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="default", help=argparse.SUPPRESS)  # the children's model
    args = parser.parse_args()
    sizes = SMOKE_SIZES if args.smoke else SIZES
    if args.smoke:
        args.steps, args.warmup = 3, 1
    if args.child:
        return child(args.child, args.steps, args.model, sizes)

    contacts_train_file()  # generate the data once, outside the timed children
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            from ftengine.testing import save_tiny_model

            args.model = str(save_tiny_model(Path(tmp) / "tiny"))
        for name in ("ftengine", "peft"):
            command = [sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--model", args.model]
            done = subprocess.run([*command, *(["--smoke"] if args.smoke else [])], capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result["median_step_s"] = statistics.median(result["step_times"][args.warmup :])
            results[name] = result
    ours, theirs = results["ftengine"], results["peft"]
    summary = {
        "smoke": args.smoke,
        "model": "tiny test model" if args.smoke else "SmolLM2-135M-Instruct",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "config": {
            **sizes,
            "dropout": DROPOUT,
            "steps": args.steps,
            "warmup": args.warmup,
        },
        "results": results,
        "step_time_ratio": ours["median_step_s"] / theirs["median_step_s"],
        "peak_memory_ratio": ours["peak_memory_mb"] / theirs["peak_memory_mb"],
    }
    print(f"{'':10} {'median step (s)':>16} {'peak memory (MB)':>17} {'loss first -> last':>19}")
    for name, result in results.items():
        losses = f"{result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}"
        print(f"{name:10} {result['median_step_s']:16.3f} {result['peak_memory_mb']:17.0f} {losses:>19}")
    suffix = " (smoke run: not meaningful)" if args.smoke else ""
    print(
        f"ratio ftengine/peft: step time {summary['step_time_ratio']:.3f}, peak memory {summary['peak_memory_ratio']:.3f}{suffix}"
    )
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
