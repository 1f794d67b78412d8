"""GRPO on the contacts task from the default job's adapter: scores before and after, one command.

    make run                                          # the default job: runs/default/final
    python examples/benchmarks/grpo_contacts.py       # about 10 min of GRPO on a quiet 2-core CPU, plus evaluations
    python examples/benchmarks/grpo_contacts.py --max-steps 2 --eval-rows 8 --out runs/grpo-smoke   # end to end, quickly

1. Copies the adapter (``--adapter``, default ``runs/default/final``) into ``OUT/sft-adapter``
   (the source is only read) and folds it into SmolLM2-135M-Instruct: ``ftengine merge`` to
   ``OUT/sft-merged``.
2. Runs ``examples/contacts/grpo_job.yaml`` on it with ``--eval-before``, on the default job's
   data (``ftengine_contacts.default_job``): its training rows as GRPO prompts, rewarded by
   the contacts reward, and its evaluation sets (valid, heldout, blind) scored by the
   ``contacts`` and ``drift`` plugins before and after. Extra ``-o`` overrides pass through
   (``-o train.max_steps=60``); ``--eval-rows N`` scores the first N rows of each set only.
3. Prints, and writes to ``OUT/summary.json``: schema-valid, exact-record and per-field scores
   of each set before and after, the reward of every step (``metrics.jsonl``), the drift (KL
   of the answers to general prompts to the SFT model's, and perplexity), and the time spent.

The step before is the SFT adapter merged: the evaluation before training scores the model
with the new LoRA off. An existing ``OUT/run`` is refused by ``ftengine run``; ``--overwrite``
moves it aside.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

JOB = Path(__file__).resolve().parents[1] / "contacts" / "grpo_job.yaml"
SETS = {"valid": "eval_", "heldout": "eval_heldout_", "blind": "eval_blind_"}
FIELDS = ("name", "age", "city", "email", "phone", "date")


def ftengine(*args):
    command = [sys.executable, "-m", "ftengine.cli", *map(str, args)]
    print("$ ftengine " + " ".join(map(str, args)), flush=True)
    subprocess.run(command, check=True)


def data_files(out, eval_rows):
    """``{key: path}`` of the default job's data; with ``eval_rows``, each evaluation set cut to
    its first rows, written under ``out/data``."""
    from ftengine_contacts.default_job import default_job_config

    data = default_job_config()["data"]
    files = {"train": data["train"], "eval": data["eval"], **{f"eval_sets.{n}": p for n, p in data["eval_sets"].items()}}
    if eval_rows:
        (out / "data").mkdir(parents=True, exist_ok=True)
        for key, path in list(files.items())[1:]:
            cut = out / "data" / Path(path).name
            cut.write_text("".join(Path(path).read_text().splitlines(keepends=True)[:eval_rows]))
            files[key] = cut
    return files


def prepare_model(adapter, out):
    """The SFT adapter, copied, folded into its base: the model GRPO starts from."""
    merged = out / "sft-merged"
    if (merged / "config.json").is_file():
        print(f"{merged} is there: reusing it", flush=True)
        return merged
    copy = out / "sft-adapter"
    if copy.exists():
        shutil.rmtree(copy)  # our own copy from an earlier try, never the source
    shutil.copytree(adapter, copy)
    ftengine("merge", "--model", "default", "--adapter", copy, "--out", merged, "--overwrite")
    return merged


def summarise(run_dir):
    """Before/after scores, the reward curve and the drift, from the run's ``metrics.jsonl``."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_time_s" in r and "baseline" not in r]
    before, after = evals[0], evals[-1]
    steps = [r for r in records if "reward" in r and "eval_time_s" not in r]
    scores = {}
    for name, prefix in SETS.items():
        if f"{prefix}exact_match" not in after:
            continue
        keys = ["schema_valid", "exact_match", *(f"field_{f}" for f in FIELDS)]
        scores[name] = {key: {"before": before[prefix + key], "after": after[prefix + key]} for key in keys}
    return {
        "steps": len(steps),
        "scores": scores,
        "reward_curve": [{"step": r["step"], "reward": r["reward"], "reward_std": r["reward_std"]} for r in steps],
        "frac_reward_zero_std": [r["frac_reward_zero_std"] for r in steps],
        "completion_length": [r["completion_length"] for r in steps],
        "drift": {
            key: {"before": before.get(f"eval_drift_{key}"), "after": after.get(f"eval_drift_{key}")} for key in ("kl", "ppl")
        },
        "train_time_s": sum(r.get("step_time_s", 0) for r in steps),
        "eval_time_s": {"before": before["eval_time_s"], "after": after["eval_time_s"]},
    }


def print_summary(summary):
    print(f"\nGRPO, {summary['steps']} steps ({summary['train_time_s'] / 60:.1f} min of steps)")
    print("| set: score | before (SFT) | after GRPO |\n|---|---:|---:|")
    for name, scores in summary["scores"].items():
        for key, pair in scores.items():
            print(f"| {name}: {key} | {pair['before']:.0%} | {pair['after']:.0%} |")
    drift = summary["drift"]
    if drift["kl"]["after"] is not None:
        print(f"| drift from the SFT model: KL | {drift['kl']['before']:.3f} | {drift['kl']['after']:.3f} |")
        print(f"| perplexity on general text | {drift['ppl']['before']:.1f} | {drift['ppl']['after']:.1f} |")
    curve = summary["reward_curve"]
    print("reward by step (mean of the step's completions, 0-2):", " ".join(f"{r['reward']:.2f}" for r in curve))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", type=Path, default=Path("runs/default/final"), help="the SFT adapter to start from")
    parser.add_argument("--out", type=Path, default=Path("runs/grpo-contacts"), help="where the model, run and summary go")
    parser.add_argument("--max-steps", type=int, help="GRPO steps (default: grpo_job.yaml's)")
    parser.add_argument("--eval-rows", type=int, help="score only the first N rows of each evaluation set")
    parser.add_argument("--overwrite", action="store_true", help="move an earlier OUT/run aside and start again")
    parser.add_argument("-o", "--override", dest="overrides", action="append", default=[], help="more ftengine -o overrides")
    args = parser.parse_args(argv)
    if not (args.adapter / "adapter_config.json").is_file():
        sys.exit(f"{args.adapter}: no adapter_config.json; run the default job first (make run) or pass --adapter DIR")
    args.out.mkdir(parents=True, exist_ok=True)
    files = data_files(args.out, args.eval_rows)
    merged = prepare_model(args.adapter, args.out)
    overrides = [f"model={merged}", f"output_dir={args.out / 'run'}", *(f"data.{key}={path}" for key, path in files.items())]
    if args.max_steps:
        overrides.append(f"train.max_steps={args.max_steps}")
    overrides += args.overrides
    flags = ["--eval-before", *(["--overwrite"] if args.overwrite else [])]
    ftengine("run", JOB, *flags, *(part for o in overrides for part in ("-o", o)))
    summary = summarise(args.out / "run")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print_summary(summary)


if __name__ == "__main__":
    main()
