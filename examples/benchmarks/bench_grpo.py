"""GRPO with LoRA: ftengine's ``grpo`` plugin against TRL's ``GRPOTrainer`` + PEFT, one command.

    python examples/benchmarks/bench_grpo.py [--steps 6] [--prompts 2] [--generations 8] [--out results.json]
    python examples/benchmarks/bench_grpo.py --smoke     # the tiny test model, toy sizes: timings mean nothing

What a user would pick instead of ftengine is TRL's ``GRPOTrainer`` with a PEFT ``LoraConfig``
(generation on a CPU through transformers' ``generate``: TRL's vLLM and continuous-batching
paths are off). Both train SmolLM2-135M-Instruct (the default job's model) with LoRA r=16,
alpha 32, no dropout, on all linear layers, fp32 (``--bf16``: bf16 autocast on both sides,
ftengine's ``train.precision: bf16``, TRL's ``bf16=True``), no activation checkpointing, AdamW lr 1e-5,
on the same prompts: the first ``steps x prompts`` rows of the default job's training data
(the contacts task; each side takes every prompt once, in its own order), scored by the
contacts reward (``ftengine_contacts.rewards``). Each step generates ``--generations``
completions of each of ``--prompts`` prompts (TRL's ``per_device_train_batch_size`` is
``prompts x generations``), at most ``--completion-length`` tokens each, sampled at
temperature 1 (top_p 1, no top_k), then takes one optimiser step on them: loss ``dapo``,
``scale_rewards`` ``group``, ``beta`` 0 (no reference forward; ``--beta 0.04`` adds it on
both sides), one iteration per generation batch: TRL's defaults, which ftengine's match.

Each side runs in its own child process, so its peak memory is its own: the process's max RSS
(``resource.getrusage``; the model's loading included, and the RSS once the model is loaded,
so the difference is what training added). Reported: the median step time (and the process's
CPU seconds per step, user + sys of all its threads, which a machine shared with other work
inflates less than wall time), the total over all steps, the completion tokens generated per second of step time (completion lengths
differ with sampling; a longer one costs more), the mean reward, and the ratios TRL /
ftengine.

``--smoke`` runs the same code on the tiny test model (``ftengine.testing.save_tiny_model``,
written to a temporary directory), 2 steps of 2 prompts (cut short: its tokenizer spells
bytes) x 2 completions of 8 tokens.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

R, ALPHA, LR, SEED = 16, 32, 1e-5, 0
SMOKE = {"steps": 2, "prompts": 2, "generations": 2, "completion_length": 8}
SMOKE_PROMPT_CHARS = 60  # the tiny tokenizer spells bytes and the tiny model has 512 positions
MAX_LENGTH = 1024  # prompt + completion: above every contacts prompt, so neither side drops or cuts one


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_rss_mb():
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def prompt_rows(n, smoke):
    """The first ``n`` chat rows of the default job's training data (the final assistant turn is
    the reference record the reward reads), their user turns cut short under ``--smoke``."""
    from ftengine_contacts.default_job import default_job_config

    source = Path(default_job_config()["data"]["train"])
    rows = [json.loads(line) for line in source.read_text().splitlines()[:n]]
    if smoke:
        for row in rows:
            for message in row["messages"]:
                if message["role"] == "user":
                    message["content"] = message["content"][:SMOKE_PROMPT_CHARS]
    return rows


def run_ftengine(args, rows, out):
    from ftengine import hookimpl
    from ftengine.build import configure
    from ftengine.loop import train

    data = Path(out) / "prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    overrides = [
        f"model={args.model}",
        f"output_dir={Path(out) / 'run'}",
        f"data.train={data}",
        f"train.max_steps={args.steps}",
        f"train.batch_size={args.prompts}",
        f"train.max_length={MAX_LENGTH}",
        f"train.lr={LR}",
        "train.warmup_steps=0",
        f"train.precision={'bf16' if args.bf16 else 'fp32'}",
        f"train.seed={SEED}",
        f"lora.r={R}",
        f"lora.alpha={ALPHA}",
        "lora.dropout=0",
        "lora.target_modules=all-linear",
        f"grpo.num_generations={args.generations}",
        f"grpo.max_completion_length={args.completion_length}",
        f"grpo.beta={args.beta}",
    ]
    config, pm = configure(None, ["lora", "grpo", "contacts", "no:progress"], overrides)
    loaded, cpu_times = {}, []

    class Probe:  # the RSS once the model is built, and the CPU time between step ends
        @hookimpl
        def ftengine_on_train_start(self):
            loaded["rss_mb"], self.cpu = current_rss_mb(), time.process_time()

        @hookimpl
        def ftengine_on_step_end(self):
            cpu_times.append(time.process_time() - self.cpu)
            self.cpu = time.process_time()

    pm.register(Probe())
    train(config, pm)
    records = [json.loads(line) for line in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_time_s" in r]
    return {
        "step_times": [r["step_time_s"] for r in steps],
        "step_cpu_times": cpu_times,
        "completion_tokens": [r["completion_length"] * args.prompts * args.generations for r in steps],
        "rewards": [r["reward"] for r in steps],
        "loaded_rss_mb": loaded["rss_mb"],
    }


def run_trl(args, rows, out):
    import torch
    from datasets import Dataset
    from ftengine.plugins.hf_loader import load_pretrained
    from ftengine_contacts.rewards import contact_reward
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    def contacts(prompts, completions, messages, **_):
        """The contacts reward, on TRL's conversational completions and the rows' messages."""
        texts = [completion[-1]["content"] for completion in completions]
        return contact_reward(prompts, texts, [{"messages": m} for m in messages])

    data = Dataset.from_list([{"prompt": row["messages"][:-1], "messages": row["messages"]} for row in rows])
    model, tokenizer = load_pretrained(args.model)
    loaded_rss = current_rss_mb()
    config = GRPOConfig(
        output_dir=out,
        num_generations=args.generations,
        per_device_train_batch_size=args.prompts * args.generations,
        gradient_accumulation_steps=1,
        max_completion_length=args.completion_length,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=args.beta,
        loss_type="dapo",
        scale_rewards="group",
        num_iterations=1,
        max_steps=args.steps,
        learning_rate=LR,
        warmup_steps=0,
        max_grad_norm=1.0,
        # GRPOConfig defaults to bf16 autocast and activation checkpointing; here TRL computes in
        # the precision ftengine does (fp32, or bf16 autocast with --bf16) and keeps activations
        # (the faster setting), as ftengine does.
        bf16=args.bf16,
        gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        shuffle_dataset=True,
        seed=SEED,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
    )
    lora = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    step_times, cpu_times = [], []

    class StepTimes(TrainerCallback):  # generation, scoring and the update all happen inside a step
        def on_step_begin(self, args, state, control, **kwargs):
            self.started, self.cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.started)
            cpu_times.append(time.process_time() - self.cpu)

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=contacts,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[StepTimes()],
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "completions/mean_length" in entry]
    return {
        "step_times": step_times,
        "step_cpu_times": cpu_times,
        "completion_tokens": [entry["completions/mean_length"] * args.prompts * args.generations for entry in logs],
        "rewards": [entry["reward"] for entry in logs],
        "loaded_rss_mb": loaded_rss,
    }


def child(args):
    import torch

    torch.manual_seed(SEED)
    rows = prompt_rows(args.steps * args.prompts, args.smoke)
    with tempfile.TemporaryDirectory() as out:
        result = (run_ftengine if args.child == "ftengine" else run_trl)(args, rows, out)
    print(json.dumps({"name": args.child, **result, "peak_rss_mb": peak_rss_mb()}))


def summarise(result):
    times = result["step_times"]
    return {
        **result,
        "steps": len(times),
        "median_step_s": statistics.median(times),
        "median_step_cpu_s": statistics.median(result["step_cpu_times"]),
        "total_s": sum(times),
        "completion_tokens_per_s": sum(result["completion_tokens"]) / sum(times),
        "mean_reward": statistics.fmean(result["rewards"]),
    }


def compare(args):
    """Each side in a child process; a side that fails is reported and fails the run at the end.
    The sides run one after the other, but at the same time under ``--smoke`` (whose timings
    mean nothing): its cost is mostly importing TRL, and the suite runs it."""
    prompt_rows(args.steps * args.prompts, args.smoke)  # the data is generated outside the timed children
    sizes = ["--steps", args.steps, "--prompts", args.prompts, "--generations", args.generations]
    sizes += ["--completion-length", args.completion_length, "--beta", args.beta, "--model", args.model]
    flags = [*(["--bf16"] if args.bf16 else []), *(["--smoke"] if args.smoke else [])]
    results, failed, children, outputs = {}, [], {}, {}
    for name in ("ftengine", "trl"):
        command = [sys.executable, __file__, "--child", name, *map(str, sizes), *flags]
        children[name] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if not args.smoke:
            outputs[name] = children[name].communicate()
    for name, process in children.items():
        stdout, stderr = outputs.get(name) or process.communicate()
        if process.returncode:
            print(f"{name}: failed\n{stderr[-3000:]}", flush=True)
            failed.append(name)
            continue
        result = results[name] = summarise(json.loads(stdout.strip().splitlines()[-1]))
        print(
            f"{name:9s} {result['steps']} steps  median step {result['median_step_s']:.2f} s ({result['median_step_cpu_s']:.1f} CPU s)  total {result['total_s']:.1f} s  "
            f"{result['completion_tokens_per_s']:.1f} completion tok/s  mean reward {result['mean_reward']:.3f}  "
            f"RSS loaded {result['loaded_rss_mb']:,.0f} MiB, peak {result['peak_rss_mb']:,.0f} MiB",
            flush=True,
        )
    report = {
        "smoke": args.smoke,
        "sizes": {key.lstrip("-"): value for key, value in zip(sizes[::2], sizes[1::2])},
        "bf16": args.bf16,
        "results": results,
        "failed": failed,
    }
    if not failed:
        ours, theirs = results["ftengine"], results["trl"]
        report["ratios_trl_over_ftengine"] = {
            "median_step_s": theirs["median_step_s"] / ours["median_step_s"],
            "median_step_cpu_s": theirs["median_step_cpu_s"] / ours["median_step_cpu_s"],
            "total_s": theirs["total_s"] / ours["total_s"],
            "completion_tokens_per_s": ours["completion_tokens_per_s"] / theirs["completion_tokens_per_s"],
            "peak_rss_mb": theirs["peak_rss_mb"] / ours["peak_rss_mb"],
        }
        ratios = report["ratios_trl_over_ftengine"]
        print(
            f"TRL / ftengine: median step {ratios['median_step_s']:.2f}x ({ratios['median_step_cpu_s']:.2f}x in CPU time), total {ratios['total_s']:.2f}x, "
            f"completion tok/s (ftengine / TRL) {ratios['completion_tokens_per_s']:.2f}x, peak RSS {ratios['peak_rss_mb']:.2f}x"
        )
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return failed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="optimiser steps (each side takes steps x prompts prompts once)")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (num_generations)")
    parser.add_argument("--completion-length", type=int, default=64, help="most tokens per completion")
    parser.add_argument("--beta", type=float, default=0.0, help="KL weight; above 0 both sides run the reference forward")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (weights and optimiser stay fp32)")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    parser.add_argument("--smoke", action="store_true", help="the tiny test model, toy sizes: timings mean nothing")
    parser.add_argument("--child", choices=["ftengine", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--model", default="default", help=argparse.SUPPRESS)  # the children's model
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    if args.smoke:
        vars(args).update(SMOKE)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            from ftengine.testing import save_tiny_model

            args.model = str(save_tiny_model(Path(tmp) / "tiny"))
        failed = compare(args)
    if args.smoke:
        print("(smoke run: not meaningful)")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
