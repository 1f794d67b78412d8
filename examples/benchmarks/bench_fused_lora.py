"""Fused LoRA benchmark (CUDA only): the Triton kernels against PEFT and eager LoRA.

    python examples/benchmarks/bench_fused_lora.py --out fused_lora.json
    python examples/benchmarks/bench_fused_lora.py --e2e --out fused_lora_e2e.json

Layer mode: one linear layer, k = n = 4096, bf16, T in {1024, 4096, 8192} tokens, r in {16, 64},
dropout 0 and 0.1, alpha = 2r. Each row is the median forward + backward time
(``triton.testing.do_bench``, gradients reset between runs) of

* base:  the frozen base matmul alone (X requires grad, W does not), the floor;
* peft:  PEFT's ``peft.tuners.lora.Linear`` from ``get_peft_model`` on a one-Linear module,
  adapter weights in bf16 (``autocast_adapter_dtype=False``) like the others;
* eager: the same LoRA in plain torch ops;
* fused: ``fused_lora_linear``;

printed as milliseconds, as ratios to base, and as fused's speedup over PEFT. Before timing, the
outputs of peft, eager and fused are compared at dropout 0 (same weights).

End-to-end mode (``--e2e``): a ~1.2B Llama (Llama-3.2-1B shape: hidden 2048, 16 layers,
vocab 128256) with random weights in bf16, LoRA r=16, alpha=32, dropout 0.05 on every linear
layer but the head, AdamW, one fixed batch of random tokens under bf16 autocast. Three setups,
each in its own process so that its peak memory (``torch.cuda.max_memory_allocated``) is its
own: PEFT (``get_peft_model``, its defaults), ftengine's ``LoraLinear`` eager, and the same
layers with the fused kernel installed through the ``ftengine_lora_kernel`` hook, as the
``lora`` plugin does at train start. Reports tokens/s over the timed steps and peak memory.
``--variant dora`` runs DoRA instead (dropout 0, which the fused DoRA path needs; PEFT with
``use_dora``), ``--variant qlora`` LoRA over the same model quantised to NF4 by the ``qlora``
plugin (PEFT wraps those ``Linear4bit`` layers with its bitsandbytes LoRA layer). The issue's
goal is stated for LoRA; the variants report the same ratio without a verdict.

``--smoke`` runs either mode at toy sizes (hidden 64, a 2-layer Llama), on the CPU through
Triton's interpreter when there is no GPU, timed with a wall clock: it proves the script runs
end to end (CI does this) and its timings mean nothing.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN = 4096
LAYER_TOKENS = (1024, 4096, 8192)
LAYER_RANKS = (16, 64)
LAYER_DROPOUTS = (0.0, 0.1)

E2E_SETUPS = ("peft", "lora", "lora+fused_lora")
E2E_VARIANTS = ("lora", "dora", "qlora")
LLAMA_1B = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}
E2E_RANK, E2E_ALPHA, E2E_DROPOUT, E2E_LR = 16, 32, 0.05, 1e-4

# --smoke: the same code paths at toy sizes.
SMOKE_HIDDEN, SMOKE_TOKENS, SMOKE_RANKS = 64, (37,), (4, 16)
SMOKE_LLAMA = {**LLAMA_1B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
SMOKE_LLAMA.update(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
SMOKE_E2E = {"batch": 2, "seq": 16, "steps": 1, "warmup": 1}


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def median_ms(step, grads, repeats=3):
    """Median wall time of ``step`` in ms, gradients reset first: ``do_bench`` without a GPU."""
    times = []
    for _ in range(repeats):
        for tensor in grads:
            tensor.grad = None
        started = time.perf_counter()
        step()
        times.append(1000 * (time.perf_counter() - started))
    return sorted(times)[len(times) // 2]


# --------------------------------------------------------------------------------------------
# one layer
# --------------------------------------------------------------------------------------------


def peft_layer(weight, lora_a, lora_b, r, alpha, dropout):
    """PEFT's LoRA layer around a bias-free Linear holding ``weight``, with our A and B."""
    from peft import LoraConfig, get_peft_model

    class OneLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)

        def forward(self, x):
            return self.proj(x)

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["proj"])
    layer = get_peft_model(OneLinear(), config, autocast_adapter_dtype=False).base_model.model.proj
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        layer.lora_A["default"].weight.copy_(lora_a)
        layer.lora_B["default"].weight.copy_(lora_b)
    return layer.train()


def bench_layer(T, r, p, hidden=HIDDEN):
    from ftengine.plugins.fused_lora.kernel import fused_lora_linear

    torch.manual_seed(0)
    dtype = torch.bfloat16
    on = {"device": device(), "dtype": dtype}
    x = torch.randn(T, hidden, **on, requires_grad=True)
    grad = torch.randn(T, hidden, **on)
    weight = torch.randn(hidden, hidden, **on) / hidden**0.5
    lora_a = (torch.randn(r, hidden, **on) / hidden**0.5).requires_grad_()
    lora_b = (torch.randn(hidden, r, **on) / r**0.5).requires_grad_()
    alpha = 2 * r
    scale = alpha / r
    peft = peft_layer(weight, lora_a.detach(), lora_b.detach(), r, alpha, p)
    peft_params = [param for param in peft.parameters() if param.requires_grad]

    forwards = {
        "base": (lambda: x @ weight.T, [x]),
        "peft": (lambda: peft(x), [x, *peft_params]),
        "eager": (lambda: x @ weight.T + scale * (F.dropout(x, p) @ lora_a.T) @ lora_b.T, [x, lora_a, lora_b]),
        "fused": (lambda: fused_lora_linear(x, weight, None, lora_a, lora_b, scale, p), [x, lora_a, lora_b]),
    }
    row = {"T": T, "k": hidden, "n": hidden, "r": r, "dropout": p}
    if p == 0:
        with torch.no_grad():
            outputs = {name: forward().float() for name, (forward, _) in forwards.items() if name != "base"}
        size = outputs["eager"].abs().max().item()
        row["max_rel_diff_fused_vs_eager"] = (outputs["fused"] - outputs["eager"]).abs().max().item() / size
        row["max_rel_diff_peft_vs_eager"] = (outputs["peft"] - outputs["eager"]).abs().max().item() / size

    for name, (forward, grads) in forwards.items():

        def step(forward=forward):
            forward().backward(grad)

        if device() == "cuda":
            from triton.testing import do_bench

            row[f"{name}_ms"] = do_bench(step, grad_to_none=grads, return_mode="median")
        else:
            row[f"{name}_ms"] = median_ms(step, grads)
    return row


def print_layer_table(rows):
    header = f"{'T':>5} {'r':>3} {'p':>4} | {'base ms':>8} | {'peft ms':>8} {'x':>5} | {'eager ms':>8} {'x':>5} "
    header += f"| {'fused ms':>8} {'x':>5} | {'vs peft':>7}"
    print(header)
    print("-" * len(header))
    for row in rows:
        base = row["base_ms"]
        line = f"{row['T']:>5} {row['r']:>3} {row['dropout']:>4} | {base:>8.3f} "
        for name in ("peft", "eager", "fused"):
            line += f"| {row[f'{name}_ms']:>8.3f} {row[f'{name}_ms'] / base:>5.2f} "
        line += f"| {row['peft_ms'] / row['fused_ms']:>6.2f}x"
        print(line)
    print("x: time relative to the base matmul alone; vs peft: PEFT's time over fused's.")


# --------------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------------


def build_e2e(setup, model_config, variant):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device()):
        model = LlamaForCausalLM(LlamaConfig(**model_config)).to(torch.bfloat16)
    if variant == "qlora":
        from types import SimpleNamespace

        from ftengine.plugins import qlora

        qlora.ftengine_quantize_model(model, SimpleNamespace(qlora=qlora.QloraOptions()))
    dropout = 0.0 if variant == "dora" else E2E_DROPOUT
    if setup == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=E2E_RANK,
            lora_alpha=E2E_ALPHA,
            lora_dropout=dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
            use_dora=variant == "dora",
        )
        return get_peft_model(model, config)

    from ftengine.plugins import fused_lora
    from ftengine.plugins.dora import DORA
    from ftengine.plugins.lora.layer import inject_adapter, select_targets

    model.requires_grad_(False)
    paths = select_targets(model, "all-linear")
    layers = inject_adapter(
        model, paths, "default", r=E2E_RANK, alpha=E2E_ALPHA, dropout=dropout, variant=DORA if variant == "dora" else None
    )
    for layer in layers:
        layer.set_active_adapter("default")
        if setup == "lora+fused_lora":
            layer.kernel["default"] = fused_lora.ftengine_lora_kernel(layer=layer, name="default")
    if setup == "lora+fused_lora":
        print(fused_lora.summary(model), file=sys.stderr)
    return model


def measure_e2e(setup, batch, seq, steps, warmup, model_config, variant):
    cuda = device() == "cuda"
    model = build_e2e(setup, model_config, variant).train()
    params = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=E2E_LR)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model_config["vocab_size"], (batch, seq), generator=generator).to(device())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses = []
    for step in range(warmup + steps):
        if step == warmup:
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast(device(), dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return {
        "setup": setup,
        "variant": variant,
        "batch": batch,
        "seq": seq,
        "steps": steps,
        "tokens_per_s": round(batch * seq * steps / elapsed),
        "step_ms": round(1000 * elapsed / steps, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "trainable": sum(param.numel() for param in params),
        "loss_first": round(float(losses[0]), 4),
        "loss_last": round(float(losses[-1]), 4),
    }


def run_e2e(args):
    results = []
    for setup in E2E_SETUPS:
        command = [
            sys.executable,
            __file__,
            "--e2e-only",
            setup,
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--variant",
            args.variant,
            *(["--smoke"] if args.smoke else []),
        ]
        child = subprocess.run(command, capture_output=True, text=True)
        if child.returncode != 0:
            sys.exit(f"{setup} failed:\n{child.stderr[-3000:]}")
        sys.stderr.write(child.stderr)
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(f"{'setup':<16} | {'tokens/s':>9} | {'step ms':>8} | {'peak GiB':>8} | {'loss first → last':>18}")
    for row in results:
        losses = f"{row['loss_first']:.4f} → {row['loss_last']:.4f}"
        peak = "-" if row["peak_gib"] is None else row["peak_gib"]
        line = f"{row['setup']:<16} | {row['tokens_per_s']:>9} | {row['step_ms']:>8} | {peak:>8} | "
        print(line + f"{losses:>18}")
    return results


# --------------------------------------------------------------------------------------------
# the goals
# --------------------------------------------------------------------------------------------


def layer_goals(rows):
    """Fused ≤ 1.15× the base matmul at the largest T measured; ≥ 1.3× faster than PEFT."""
    largest = max(row["T"] for row in rows)
    overhead = max(row["fused_ms"] / row["base_ms"] for row in rows if row["T"] == largest)
    speedup = min(row["peft_ms"] / row["fused_ms"] for row in rows)
    return [
        {"goal": f"fused / base at T={largest}, worst case <= 1.15", "value": overhead, "met": overhead <= 1.15},
        {"goal": "PEFT / fused, worst case >= 1.3", "value": speedup, "met": speedup >= 1.3},
    ]


def e2e_goals(rows, variant):
    """End-to-end tokens/s with the plugin ≥ 1.2× PEFT's (a goal for LoRA; reported for the others)."""
    tokens = {row["setup"]: row["tokens_per_s"] for row in rows}
    speedup = tokens["lora+fused_lora"] / tokens["peft"]
    if variant != "lora":
        return [{"goal": f"tokens/s, {variant}: fused / peft (no goal set)", "value": speedup, "met": None}]
    return [{"goal": "tokens/s, lora+fused_lora / peft >= 1.2", "value": speedup, "met": speedup >= 1.2}]


def print_goals(goals, smoke):
    for goal in goals:
        verdict = "(smoke run: not meaningful)" if smoke else {True: "met", False: "NOT MET", None: ""}[goal["met"]]
        print(f"goal: {goal['goal']}: {goal['value']:.2f} {verdict}")


# --------------------------------------------------------------------------------------------


def environment():
    import peft
    import transformers
    import triton

    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--tokens", type=int, nargs="+", default=LAYER_TOKENS, help="layer mode: values of T")
    parser.add_argument("--ranks", type=int, nargs="+", default=LAYER_RANKS, help="layer mode: values of r")
    parser.add_argument("--e2e", action="store_true", help="time training steps of a ~1B Llama instead")
    parser.add_argument("--batch", type=int, default=4, help="e2e: sequences per step")
    parser.add_argument("--seq", type=int, default=1024, help="e2e: tokens per sequence")
    parser.add_argument("--steps", type=int, default=10, help="e2e: timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="e2e: untimed steps first")
    parser.add_argument("--variant", choices=E2E_VARIANTS, default="lora", help="e2e: LoRA, DoRA, or LoRA on an NF4 base")
    parser.add_argument("--smoke", action="store_true", help="toy sizes, CPU allowed: checks the script, times mean nothing")
    parser.add_argument("--e2e-only", choices=E2E_SETUPS, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.ranks = SMOKE_TOKENS, SMOKE_RANKS
        vars(args).update(SMOKE_E2E)
        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported; children inherit it
    elif not torch.cuda.is_available():
        sys.exit("bench_fused_lora.py needs a CUDA device (or --smoke to check the script on CPU).")
    hidden, model_config = (SMOKE_HIDDEN, SMOKE_LLAMA) if args.smoke else (HIDDEN, LLAMA_1B)

    if args.e2e_only:
        print(json.dumps(measure_e2e(args.e2e_only, args.batch, args.seq, args.steps, args.warmup, model_config, args.variant)))
        return
    results = {"environment": environment(), "smoke": args.smoke}
    if args.e2e:
        results["e2e"] = run_e2e(args)
        results["goals"] = e2e_goals(results["e2e"], args.variant)
    else:
        rows = [bench_layer(T, r, p, hidden) for T in args.tokens for r in args.ranks for p in LAYER_DROPOUTS]
        print_layer_table(rows)
        worst = max(row.get("max_rel_diff_fused_vs_eager", 0.0) for row in rows)
        print(f"largest relative difference, fused vs eager outputs at dropout 0: {worst:.2e}")
        results["layer"] = rows
        results["goals"] = layer_goals(rows)
    print_goals(results["goals"], args.smoke)
    if args.out:
        with open(args.out, "w") as out:
            json.dump(results, out, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
