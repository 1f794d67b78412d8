"""SFT with LoRA: ftengine against TRL's SFTTrainer + PEFT on the default job's data, one command.

    python examples/benchmarks/bench_sft.py [--examples 96] [--out results.json]

What a user would pick instead of ftengine is TRL's ``SFTTrainer`` with a PEFT ``LoraConfig``.
Both train SmolLM2-135M-Instruct (the default job's model) with LoRA r=16, alpha 32, dropout
0.05 on all linear layers, AdamW lr 2e-3, on the first ``--examples`` rows of the default job's
training data (the contacts task), one epoch, loss on the assistant answer only, so every
configuration trains on the same target tokens (counted and reported for each). Four
configurations, each in its own child process (peak memory = that process's max RSS, loading
included):

* ``ftengine packed``: the default job's settings, ``train.packing`` into rows of 448 tokens,
  2 rows per step.
* ``ftengine padded``: batches of 8 examples padded to the longest (``train.max_length`` 256).
* ``trl packed``: ``SFTConfig(packing=True)`` (TRL's best-fit-decreasing packing, padding-free
  batches with position_ids), ``max_length`` 448, 2 rows per step.
* ``trl padded``: ``packing=False``, batches of 8 padded, ``max_length`` 256.

TRL runs in fp32 without gradient checkpointing, as ftengine does (``SFTConfig`` defaults to
bf16 autocast and checkpointing).

Reported: target tokens per second over the summed step times, the median step time and the
peak RSS; then ftengine's best target tokens/s over TRL's best.

    python examples/benchmarks/bench_sft.py --examples 48 --packed-vs-padded 3

times only ftengine's forward+backward on the same examples packed and padded, alternating in
one process, for a ratio that holds on a machine shared with other work.
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

R, ALPHA, DROPOUT, LR = 16, 32, 0.05, 2e-3
SETUPS = {
    "ftengine packed": {"packing": True, "batch": 2, "length": 448},
    "ftengine padded": {"packing": False, "batch": 8, "length": 256},
    "trl packed": {"packing": True, "batch": 2, "length": 448},
    "trl padded": {"packing": False, "batch": 8, "length": 256},
}


def train_rows(n):
    """The first ``n`` rows of the default job's training data, written to a file of their own."""
    from ftengine.default_job import default_job_config

    source = Path(default_job_config()["data"]["train"])
    rows = [json.loads(line) for line in source.read_text().splitlines()[:n]]
    path = Path(tempfile.gettempdir()) / f"bench_sft_{n}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_ftengine(setup, n):
    from ftengine.build import configure
    from ftengine.data import IGNORE_INDEX
    from ftengine.loop import train

    path, _ = train_rows(n)
    with tempfile.TemporaryDirectory() as out:
        overrides = [
            "model=default",
            f"output_dir={out}",
            f"data.train={path}",
            "train.epochs=1",
            f"train.batch_size={setup['batch']}",
            f"train.max_length={setup['length']}",
            f"train.packing={str(setup['packing']).lower()}",
            f"train.lr={LR}",
            "train.warmup_steps=0",
            f"lora.r={R}",
            f"lora.alpha={ALPHA}",
            f"lora.dropout={DROPOUT}",
            "lora.target_modules=all-linear",
        ]
        config, pm = configure(None, ["lora", "no:progress"], overrides)
        captured = {}

        class Count:  # reads the training rows the loop sees
            from ftengine import hookimpl

            @hookimpl
            def ftengine_on_train_start(self, model, datasets, state):
                captured["targets"] = sum(sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in datasets.train)

        pm.register(Count())
        train(config, pm)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step_time_s"] for r in records if "step_time_s" in r]
    return steps, captured["targets"]


def run_trl(setup, n):
    from datasets import Dataset
    from ftengine.plugins.hf_loader import load_pretrained
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    _, rows = train_rows(n)
    # Prompt/completion rows: TRL then trains on the completion (the assistant answer) only.
    data = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    model, tokenizer = load_pretrained("default")
    steps = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            steps.append(time.perf_counter() - self.started)

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            max_length=setup["length"],
            packing=setup["packing"],
            per_device_train_batch_size=setup["batch"],
            num_train_epochs=1,
            learning_rate=LR,
            lr_scheduler_type="cosine",
            max_grad_norm=1.0,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
            seed=0,
            # SFTConfig defaults to bf16 autocast and gradient checkpointing; ftengine computes in
            # fp32 on a CPU without recomputation, so TRL does the same here (its faster setting).
            bf16=False,
            gradient_checkpointing=False,
        )
        lora = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora, callbacks=[StepTimes()]
        )
        # TRL folds the completion mask into "labels" (-100 elsewhere); a row's first label is never predicted.
        targets = sum(sum(label != -100 for label in row["labels"][1:]) for row in trainer.train_dataset)
        trainer.train()
    return steps, targets


def packed_vs_padded(n, rounds):
    """Forward+backward time of the same ``n`` examples, packed and padded, alternating in one
    process: on a shared machine both see the same load, so their ratio holds when absolute
    times do not."""
    from ftengine.build import build, configure
    from ftengine.default_job import default_job_config
    from ftengine.plugins import sft

    path, _ = train_rows(n)
    setups = {}
    for name in ("ftengine packed", "ftengine padded"):
        setup = SETUPS[name]
        overrides = [
            f"data.train={path}",
            f"train.max_length={setup['length']}",
            f"train.packing={str(setup['packing']).lower()}",
        ]
        setups[name] = (configure(None, [], [*overrides, "output_dir=/tmp/unused"], base=default_job_config())[0], setup)
    config, pm = configure(None, [], ["output_dir=/tmp/unused"], base=default_job_config())
    model, tokenizer, _ = build(config, pm)
    model.train()
    batches = {}
    for name, (run_config, setup) in setups.items():
        datasets = sft.load_sft_data(run_config, tokenizer)
        rows = datasets.train
        batches[name] = [datasets.collate(rows[i : i + setup["batch"]]) for i in range(0, len(rows), setup["batch"])]
    times = {name: [] for name in batches}
    for _ in range(rounds):
        for name, name_batches in batches.items():
            started = time.perf_counter()
            for batch in name_batches:
                sft.ftengine_compute_loss(model=model, batch=batch, state=None).loss.backward()
                model.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - started)
    for name, measured in times.items():
        tokens = sum(int(b["attention_mask"].sum()) for b in batches[name])
        padded = sum(b["input_ids"].numel() for b in batches[name])
        print(
            f"{name}: {len(batches[name])} batches, {tokens} tokens ({padded} with padding), seconds per pass {[round(t, 1) for t in measured]}"
        )
    ratio = statistics.median(times["ftengine padded"]) / statistics.median(times["ftengine packed"])
    print(f"packed speed-up over padded (median pass time ratio): {ratio:.2f}x")


def child(name, n):
    torch.manual_seed(0)
    setup = SETUPS[name]
    steps, targets = (run_ftengine if name.startswith("ftengine") else run_trl)(setup, n)
    print(json.dumps({"name": name, "step_times": steps, "target_tokens": targets, "peak_rss_mb": peak_rss_mb()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--only", action="append", choices=list(SETUPS), help="run only these setups")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--packed-vs-padded", type=int, metavar="ROUNDS", help="only time ftengine packed against padded, alternating"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.packed_vs_padded:
        return packed_vs_padded(args.examples, args.packed_vs_padded)
    if args.child:
        return child(args.child, args.examples)

    train_rows(args.examples)  # the data and the model are prepared outside the timed children
    results = {}
    for name in args.only or SETUPS:
        done = subprocess.run(
            [sys.executable, __file__, "--child", name, "--examples", str(args.examples)], capture_output=True, text=True
        )
        if done.returncode:
            print(f"{name}: failed\n{done.stderr[-3000:]}", flush=True)
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["steps"] = len(result["step_times"])
        result["median_step_s"] = statistics.median(result["step_times"])
        result["target_tokens_per_s"] = result["target_tokens"] / sum(result["step_times"])
        results[name] = result
        print(
            f"{name:16s} {result['target_tokens']:6d} target tokens  {result['steps']:3d} steps  "
            f"median step {result['median_step_s']:.2f} s  {result['target_tokens_per_s']:7.1f} target tok/s  "
            f"peak RSS {result['peak_rss_mb']:,.0f} MiB",
            flush=True,
        )
    best = {
        side: max((r for n, r in results.items() if n.startswith(side)), key=lambda r: r["target_tokens_per_s"], default=None)
        for side in ("ftengine", "trl")
    }
    if best["ftengine"] and best["trl"]:
        ratio = best["ftengine"]["target_tokens_per_s"] / best["trl"]["target_tokens_per_s"]
        print(f"ftengine best / TRL best target tokens/s: {ratio:.2f}x")
        results["ratio_best"] = ratio
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
