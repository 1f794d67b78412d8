"""SFT with LoRA: ftengine against TRL's SFTTrainer + PEFT on the default job's data, one command.

    python examples/benchmarks/bench_sft.py [--examples 96] [--out results.json]
    python examples/benchmarks/bench_sft.py --smoke [--versus-trl 1 | --packed-vs-padded 1]  # toy sizes

What a user would pick instead of ftengine is TRL's ``SFTTrainer`` with a PEFT ``LoraConfig``.
Both train SmolLM2-135M-Instruct (the default job's model) with LoRA r=16, alpha 32, dropout
0.05 on all linear layers, AdamW lr 2e-3, on the first ``--examples`` rows of the default job's
training data (the contacts task), one epoch, loss on the assistant answer only, so every
configuration trains on the same target tokens (counted and reported for each). Eight
configurations, each in its own child process (peak memory = that process's max RSS, loading
included):

* ``ftengine packed``: the default job's settings, ``train.packing`` into rows of 448 tokens,
  2 rows per step.
* ``ftengine padded``: batches of 8 examples padded to the longest (``train.max_length`` 256).
* ``trl packed``: ``SFTConfig(packing=True)`` (TRL's best-fit-decreasing packing, padding-free
  batches with position_ids), ``max_length`` 448, 2 rows per step.
* ``trl padded``: ``packing=False``, batches of 8 padded, ``max_length`` 256.

Each again under bf16 autocast (``... bf16``; weights and optimiser states stay fp32 on both
sides): ftengine's ``train.precision=bf16``, TRL's ``bf16=True``. TRL never recomputes
activations here (``SFTConfig`` defaults to checkpointing, which is slower).

Reported: target tokens per second over the summed step times, the median step time and the
peak RSS; then ftengine's best target tokens/s over TRL's best.

    python examples/benchmarks/bench_sft.py --examples 48 --packed-vs-padded 3

times only ftengine's forward+backward on the same examples packed and padded, alternating in
one process, for a ratio that holds on a machine shared with other work.

    python examples/benchmarks/bench_sft.py --examples 24 --versus-trl 3 [--bf16]

likewise alternates ftengine's packed forward+backward (its SFT loss hook) with TRL's
(``SFTTrainer.compute_loss`` on its own packed batches of the same examples), both under the same
autocast, and prints the ratio of the median pass times.

``--smoke`` runs any of these modes on the tiny test model (``ftengine.testing.save_tiny_model``,
written to a temporary directory) and 8 examples, every row 512 tokens at most (its tokenizer
spells bytes) and padded batches of 4; the main mode runs the fp32 setups only. The timings mean
nothing then.
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
# The same under bf16 autocast (weights and optimiser in fp32 on both sides): ftengine's
# train.precision=bf16, TRL's bf16=True (still without gradient checkpointing).
SETUPS.update({f"{name} bf16": {**setup, "bf16": True} for name, setup in list(SETUPS.items())})
SMOKE_EXAMPLES, SMOKE_LENGTH, SMOKE_BATCH = 8, 512, 4  # 512: the tiny model's positions


def sized(setup, smoke):
    """``setup``, at toy sizes under ``--smoke``."""
    return {**setup, "length": SMOKE_LENGTH, "batch": min(setup["batch"], SMOKE_BATCH)} if smoke else setup


def train_rows(n):
    """The first ``n`` rows of the default job's training data, written to a file of their own."""
    from ftengine_contacts.default_job import default_job_config

    source = Path(default_job_config()["data"]["train"])
    rows = [json.loads(line) for line in source.read_text().splitlines()[:n]]
    path = Path(tempfile.gettempdir()) / f"bench_sft_{n}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_ftengine(setup, n, model_name):
    from ftengine.build import configure
    from ftengine.data import IGNORE_INDEX
    from ftengine.loop import train

    path, _ = train_rows(n)
    with tempfile.TemporaryDirectory() as out:
        overrides = [
            f"model={model_name}",
            f"output_dir={out}",
            f"data.train={path}",
            "train.epochs=1",
            f"train.batch_size={setup['batch']}",
            f"train.max_length={setup['length']}",
            f"train.packing={str(setup['packing']).lower()}",
            f"train.precision={'bf16' if setup.get('bf16') else 'fp32'}",
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


def trl_trainer(setup, n, out, model_name, callbacks=()):
    """TRL's ``SFTTrainer`` with a PEFT ``LoraConfig`` for ``setup`` on the first ``n`` rows."""
    from datasets import Dataset
    from ftengine.plugins.hf_loader import load_pretrained
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    _, rows = train_rows(n)
    # Prompt/completion rows: TRL then trains on the completion (the assistant answer) only.
    data = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    model, tokenizer = load_pretrained(model_name)
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
        # SFTConfig defaults to bf16 autocast and gradient checkpointing; the fp32 setups compute in
        # fp32 as ftengine does on a CPU, the bf16 ones under bf16 autocast as ftengine's
        # train.precision=bf16 does; neither recomputes activations (the faster setting).
        bf16=bool(setup.get("bf16")),
        gradient_checkpointing=False,
    )
    lora = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules="all-linear", task_type="CAUSAL_LM")
    return SFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora, callbacks=list(callbacks)
    )


def run_trl(setup, n, model_name):
    from transformers import TrainerCallback

    steps = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            steps.append(time.perf_counter() - self.started)

    with tempfile.TemporaryDirectory() as out:
        trainer = trl_trainer(setup, n, out, model_name, [StepTimes()])
        # TRL folds the completion mask into "labels" (-100 elsewhere); a row's first label is never predicted.
        targets = sum(sum(label != -100 for label in row["labels"][1:]) for row in trainer.train_dataset)
        trainer.train()
    return steps, targets


def packed_vs_padded(n, rounds, model_name, smoke):
    """Forward+backward time of the same ``n`` examples, packed and padded, alternating in one
    process: on a shared machine both see the same load, so their ratio holds when absolute
    times do not."""
    from ftengine.build import build, configure
    from ftengine.plugins import sft
    from ftengine_contacts.default_job import default_job_config

    path, _ = train_rows(n)
    setups = {}
    for name in ("ftengine packed", "ftengine padded"):
        setup = sized(SETUPS[name], smoke)
        overrides = [
            f"model={model_name}",
            f"data.train={path}",
            f"train.max_length={setup['length']}",
            f"train.packing={str(setup['packing']).lower()}",
            "train.group_by_length=false",  # the default job groups by length, which packing replaces
        ]
        setups[name] = (configure(None, [], [*overrides, "output_dir=/tmp/unused"], base=default_job_config())[0], setup)
    config, pm = configure(None, [], [f"model={model_name}", "output_dir=/tmp/unused"], base=default_job_config())
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


def versus_trl(n, rounds, bf16, model_name, smoke):
    """Forward+backward of the same ``n`` examples, packed, by ftengine (its loss hook) and by TRL
    (``SFTTrainer.compute_loss`` on its own packed batches: its loss and the metrics it logs),
    alternating in one process under the same autocast: on a shared machine both see the same
    load, so their ratio holds when absolute times do not. The optimiser step (the same AdamW
    over the same adapter sizes on both sides) is left out."""
    from contextlib import nullcontext

    from ftengine.build import build, configure
    from ftengine.plugins import sft
    from ftengine_contacts.default_job import default_job_config

    setup = {**sized(SETUPS["ftengine packed"], smoke), "bf16": bf16}
    path, _ = train_rows(n)
    overrides = [
        f"model={model_name}",
        "output_dir=/tmp/unused",
        f"data.train={path}",
        f"train.max_length={setup['length']}",
        "train.packing=true",
        "train.group_by_length=false",  # the default job groups by length, which packing replaces
    ]
    config, pm = configure(None, [], overrides, base=default_job_config())
    model, tokenizer, _ = build(config, pm)
    model.train()
    datasets = sft.load_sft_data(config, tokenizer)
    rows = datasets.train
    batches = {"ftengine packed": [datasets.collate(rows[i : i + setup["batch"]]) for i in range(0, len(rows), setup["batch"])]}
    out = tempfile.mkdtemp()
    trainer = trl_trainer(setup, n, out, model_name)
    trainer.model.train()
    batches["trl packed"] = list(trainer.get_train_dataloader())

    def ftengine_pass(batch):
        return sft.ftengine_compute_loss(model=model, batch=batch, state=None).loss

    def trl_pass(batch):
        return trainer.compute_loss(trainer.model, batch)

    passes = {"ftengine packed": (ftengine_pass, model), "trl packed": (trl_pass, trainer.model)}
    context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
    times = {name: [] for name in passes}
    for round_ in range(rounds + 1):  # round 0 warms up both sides and is not counted
        for name in passes if round_ % 2 else reversed(passes):
            compute, module = passes[name]
            started = time.perf_counter()
            for batch in batches[name]:
                with context():
                    loss = compute(batch)
                loss.backward()
                module.zero_grad(set_to_none=True)
            if round_:
                times[name].append(time.perf_counter() - started)
    precision = "bf16 autocast" if bf16 else "fp32"
    for name, measured in times.items():
        tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches[name])
        print(
            f"{name} ({precision}): {len(batches[name])} batches, {tokens} target tokens, seconds per pass {[round(t, 1) for t in measured]}"
        )
    ratio = statistics.median(times["trl packed"]) / statistics.median(times["ftengine packed"])
    print(f"ftengine speed-up over TRL, packed, {precision} (median pass time ratio): {ratio:.2f}x")


def child(name, n, model_name, smoke):
    torch.manual_seed(0)
    setup = sized(SETUPS[name], smoke)
    steps, targets = (run_ftengine if name.startswith("ftengine") else run_trl)(setup, n, model_name)
    print(json.dumps({"name": name, "step_times": steps, "target_tokens": targets, "peak_rss_mb": peak_rss_mb()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--only", action="append", choices=list(SETUPS), help="run only these setups")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--packed-vs-padded", type=int, metavar="ROUNDS", help="only time ftengine packed against padded, alternating"
    )
    parser.add_argument(
        "--versus-trl",
        type=int,
        metavar="ROUNDS",
        help="only time ftengine's and TRL's packed forward+backward, alternating in one process",
    )
    parser.add_argument("--bf16", action="store_true", help="with --versus-trl: under bf16 autocast")
    parser.add_argument("--smoke", action="store_true", help="the tiny test model, 8 examples: timings mean nothing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="default", help=argparse.SUPPRESS)  # the children's model
    args = parser.parse_args()
    if args.smoke:
        args.examples = SMOKE_EXAMPLES
    if args.child:
        return child(args.child, args.examples, args.model, args.smoke)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            from ftengine.testing import save_tiny_model

            args.model = str(save_tiny_model(Path(tmp) / "tiny"))
        if args.packed_vs_padded:
            packed_vs_padded(args.examples, args.packed_vs_padded, args.model, args.smoke)
        elif args.versus_trl:
            versus_trl(args.examples, args.versus_trl, args.bf16, args.model, args.smoke)
        else:
            compare_setups(args)
    if args.smoke:
        print("(smoke run: not meaningful)")


def compare_setups(args):
    """Each setup in a child process; a setup that fails is reported and fails the run at the end."""
    train_rows(args.examples)  # the data and the model are prepared outside the timed children
    names = args.only or [name for name in SETUPS if not (args.smoke and SETUPS[name].get("bf16"))]
    if args.smoke and not args.only:
        print("smoke run: the bf16 setups are left out (the same code with one flag set; bf16 is slow on most CPUs)")
    results, failed = {}, []
    for name in names:
        command = [sys.executable, __file__, "--child", name, "--examples", str(args.examples), "--model", args.model]
        done = subprocess.run([*command, *(["--smoke"] if args.smoke else [])], capture_output=True, text=True)
        if done.returncode:
            print(f"{name}: failed\n{done.stderr[-3000:]}", flush=True)
            failed.append(name)
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
    report = {"smoke": args.smoke, "examples": args.examples, "results": results, "failed": failed, "ratio_best": None}
    if best["ftengine"] and best["trl"]:
        report["ratio_best"] = best["ftengine"]["target_tokens_per_s"] / best["trl"]["target_tokens_per_s"]
        print(f"ftengine best / TRL best target tokens/s: {report['ratio_best']:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
