"""Serving many adapters over one base: load/swap latency, memory per adapter, decode speed of
mixed-adapter batches against the alternatives, and the HTTP server under concurrent clients.

    python examples/benchmarks/bench_serving.py [--tokens 32] [--clients 16,64] [--out serving.json]
    python examples/benchmarks/bench_serving.py --soak 300   # also 16 clients for 5 minutes, a fifth leaving mid-stream
    python examples/benchmarks/bench_serving.py --smoke      # the tiny test model: every path, meaningless timings
    python examples/benchmarks/bench_serving.py --fused      # CUDA: also the fused_lora kernel's mixed batches

Base: SmolLM2-135M-Instruct (``model: default``) in float32; 8 LoRA adapters, r=16, alpha 32,
all linear layers but the head, saved by ftengine with random weights (speed does not depend
on the values). Every decode configuration generates ``--tokens`` tokens for each of 8 rows
from prompts of 32 tokens, greedy, with EOS ignored so every row decodes the same number of
tokens; decode tokens/s counts the tokens after the first (the prefill is timed apart).

* ``base``: 8 rows, the base layers alone; ``one adapter``: 8 rows of one adapter through the layer's
  single-adapter path (the adapter globally active, as training runs it);
* ``mixed k``: 8 rows over k = 1, 2, 4, 8 adapters in one batch (``AdapterMethod.set_rows``);
* ``grouped``: the 8 rows over 4 adapters as 4 sequential batches of 2, one adapter active each;
* ``naive``: batch size 1, swapping the active adapter before each of the 8 requests.
* ``mixed k fused`` (``--fused``, CUDA only): as ``mixed k`` with ``fused_lora`` active, every
  layer's mixed batch through its Triton kernel (``kernel.mixed_lora_``), next to the eager
  grouped matmuls of ``mixed k`` in the same server (the kernels are switched off for those);
  the script also checks that both give the same greedy tokens for 8 rows over 4 adapters.

Goals (the issue's): mixed 8 rows over 4 adapters >= 0.8x the one-adapter batch and >= 3x the
naive path; an adapter swap < 1 ms. Then the server (``ftengine.server``) on a loopback port:
one request on the idle server (its time to the first token, the time per decode step), then
each of ``--clients`` streaming clients over 4 adapters, arriving ``--stagger`` seconds apart,
under the continuous-batching scheduler and under the static one (a batch admits rows only
when it is empty; ``--scheduler`` picks one): throughput, p50/p95 latency and time to first
token. Goals: continuous >= 2x static throughput at the first client count, and its p95 time
to first token within the idle server's prefill plus two decode steps. ``--soak SECONDS``: 16
clients for that long, every fifth disconnecting after its first token, counting errors,
answers unlike offline greedy generation, and the growth of resident memory.
"""

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


def make_adapters(model, directory, count, r, smoke):
    """``count`` LoRA adapter directories over ``model``, from one build with new values each."""
    from ftengine.build import build, configure
    from ftengine.loop import save

    lora = {"r": r, "alpha": 2 * r, "dropout": 0.0, "target_modules": "all-linear"}
    config, pm = configure(plugins=["lora"], base={"model": model, "lora": lora, "train": {"device": "cpu"}}, require_data=False)
    built, tokenizer, info = build(config, pm)
    parameters = dict(built.named_parameters())
    paths = {}
    with torch.no_grad():
        for i in range(count):
            generator = torch.Generator().manual_seed(i)
            for name in info["trainable"]:
                parameter = parameters[name]
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * (0.05 if smoke else 0.01))
            paths[f"a{i}"] = save(built, tokenizer, config, pm, Path(directory) / f"a{i}")
    return paths


def median_ms(function, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def adapter_bytes(model, name):
    from ftengine.plugins.lora.layer import lora_layers

    params = sum(
        p.numel() * p.element_size()
        for _, layer in lora_layers(model)
        for n, p in layer.named_parameters()
        if f".{name}." in f".{n}"
    )
    return params


def stack_bytes(model):
    from ftengine.plugins.lora.layer import lora_layers

    total = 0
    for _, layer in lora_layers(model):
        if layer._stack is not None:
            total += sum(t.numel() * t.element_size() for t in layer._stack[1:4] if torch.is_tensor(t))
    return total


class RowsKernels:
    """With ``on=False``, the server's LoRA layers run mixed batches eagerly although
    ``fused_lora`` gave them a rows kernel; restored on exit."""

    def __init__(self, server, on):
        from ftengine.plugins.lora.layer import lora_layers

        self.server, self.on = server, on
        self.kernels = {layer: layer.rows_kernel for _, layer in lora_layers(server.model)}

    def __enter__(self):
        for layer, kernel in self.kernels.items():
            layer.rows_kernel = kernel if self.on else None
        self.server._set_rows(None)  # the next batch sets its rows again, with or without kernels

    def __exit__(self, *exc):
        for layer, kernel in self.kernels.items():
            layer.rows_kernel = kernel
        self.server._set_rows(None)


class SingleAdapterPath:
    """Run the server's decode loop with one adapter globally active and no per-row adapters:
    the layer's single-adapter forward, what training uses (the baseline of the goals)."""

    def __init__(self, server, name):
        self.server, self.name = server, name

    def __enter__(self):
        from ftengine.inference import set_adapter

        self.set_rows = self.server._set_rows
        self.server._set_rows = lambda names: None
        set_adapter(self.server.model, self.server.pm, self.name)

    def __exit__(self, *exc):
        from ftengine.inference import set_adapter

        set_adapter(self.server.model, self.server.pm, None)
        self.server._set_rows = self.set_rows


def decode(server, prompt_ids, adapters, tokens):
    """``(prefill s, decode s, decode tokens)`` for one batch: rows ``adapters`` of ``prompt_ids``."""
    from ftengine.serving import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0)
    rows = [server.row(prompt_ids, adapter, params, index=i) for i, adapter in enumerate(adapters)]
    start = time.perf_counter()
    steps = server.run(rows)
    next(steps)
    prefill = time.perf_counter() - start
    for _ in steps:
        pass
    return prefill, time.perf_counter() - start - prefill, len(rows) * (tokens - 1)


def decode_speed(server, prompt_ids, tokens, configuration):
    """tokens/s of one configuration (see the module docstring), after one warm-up run."""
    from ftengine.inference import set_adapter

    names = list(server.adapters)

    def run(tokens):
        if configuration == "base":
            with SingleAdapterPath(server, None):  # the base layers alone
                return [decode(server, prompt_ids, [None] * 8, tokens)]
        if configuration == "one adapter":
            with SingleAdapterPath(server, names[0]):
                return [decode(server, prompt_ids, [None] * 8, tokens)]
        if configuration.startswith("mixed"):
            k = int(configuration.split()[1])
            with RowsKernels(server, on=configuration.endswith("fused")):
                return [decode(server, prompt_ids, [names[i % k] for i in range(8)], tokens)]
        if configuration == "grouped":
            results = []
            for name in names[:4]:
                with SingleAdapterPath(server, name):
                    results.append(decode(server, prompt_ids, [None] * 2, tokens))
            return results
        if configuration == "naive":
            results = []
            for i in range(8):
                with SingleAdapterPath(server, names[i % 4]):
                    results.append(decode(server, prompt_ids, [None], tokens))
            return results
        raise ValueError(configuration)

    run(3)  # warm-up
    start = time.perf_counter()
    results = run(tokens)
    total = time.perf_counter() - start
    decoded = sum(r[2] for r in results)
    set_adapter(server.model, server.pm, None)
    return {
        "configuration": configuration,
        "decode_tokens_per_s": decoded / sum(r[1] for r in results),
        "prefill_s": sum(r[0] for r in results),
        "total_s": total,
        "decode_tokens": decoded,
    }


def fused_tokens_match(server, prompt_ids, tokens):
    """Whether 8 rows over 4 adapters get the same greedy tokens through the kernel as eagerly."""
    names = list(server.adapters)
    results = []
    for on in (False, True):
        with RowsKernels(server, on):
            completions = server.generate(
                [prompt_ids] * 8, adapters=[names[i % 4] for i in range(8)], max_tokens=tokens, temperature=0
            )
        results.append([c.token_ids for c in completions])
    return results[0] == results[1]


@contextlib.contextmanager
def serving(server, continuous, max_queue):
    """The server's HTTP API on a loopback port; yields its base URL."""
    import socket

    import uvicorn
    from ftengine.server import create_app

    app = create_app(server, base_name="base", max_queue=max_queue, continuous=continuous)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        uv.should_exit = True
        thread.join(timeout=60)
        sock.close()


def stream_request(url, model, prompt, tokens, leave_after_first=False):
    """``(seconds to the first token, seconds in all, text)`` of one streaming completion; with
    ``leave_after_first`` the client disconnects after its first token."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True}
    request = urllib.request.Request(
        url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    start, first, text = time.perf_counter(), None, ""
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[len(b"data: ") :])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            first = first if first is not None else time.perf_counter() - start
            text += event["choices"][0]["text"]
            if leave_after_first:
                break
    return first, time.perf_counter() - start, text


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def serve_clients(server, clients, tokens, continuous, stagger_s):
    """Throughput, p50/p95 latency and time to first token of ``clients`` streaming clients over
    4 adapters, client ``i`` arriving ``i * stagger_s`` after the first."""
    names = list(server.adapters)
    with serving(server, continuous, max_queue=max(64, clients)) as url:
        stream_request(url, names[0], "warm-up", 2)

        def client(i):
            time.sleep(i * stagger_s)
            return stream_request(url, names[i % 4], f"Request {i}: tell me about the sea.", tokens)

        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(client, range(clients)))
        wall = time.perf_counter() - start
        stats = json.loads(urllib.request.urlopen(url + "/v1/stats").read())
    return {
        "scheduler": "continuous" if continuous else "static",
        "clients": clients,
        "max_tokens": tokens,
        "stagger_s": stagger_s,
        "tokens_per_s": clients * tokens / wall,
        "latency_p50_s": pct([r[1] for r in results], 0.5),
        "latency_p95_s": pct([r[1] for r in results], 0.95),
        "ttft_p50_s": pct([r[0] for r in results], 0.5),
        "ttft_p95_s": pct([r[0] for r in results], 0.95),
        "stats": stats,
    }


def idle_server(server, tokens):
    """One request on an idle server: its time to the first token (the prefill) and the time
    per decode step after it."""
    with serving(server, True, max_queue=4) as url:
        stream_request(url, "base", "warm-up", 2)
        first, total, _ = stream_request(url, list(server.adapters)[0], "Request 0: tell me about the sea.", tokens)
    return {"ttft_s": first, "decode_step_s": (total - first) / max(1, tokens - 1)}


def resident_mib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def soak(server, seconds, clients, tokens):
    """``clients`` clients sending streaming requests for ``seconds``, every fifth of them
    disconnecting after its first token: errors, answers that differ from offline greedy
    generation, and the growth of resident memory."""
    names = list(server.adapters)
    jobs = [(names[i % 4], f"Soak {i % 8}: tell me about the sea.") for i in range(clients)]
    expected = {job: server.generate([job[1]], adapters=[job[0]], max_tokens=tokens, temperature=0)[0].text for job in set(jobs)}
    counts = {"requests": 0, "disconnected": 0, "errors": 0, "wrong_answers": 0}
    lock = threading.Lock()
    with serving(server, True, max_queue=max(64, clients)) as url:
        stream_request(url, names[0], "warm-up", 2)
        rss_start = resident_mib()
        deadline = time.monotonic() + seconds

        def client(i):
            leaves = i % 5 == 0
            while time.monotonic() < deadline:
                try:
                    _, _, text = stream_request(url, *jobs[i], tokens, leave_after_first=leaves)
                    wrong = not leaves and text != expected[jobs[i]]
                    error = False
                except Exception:
                    wrong, error = False, True
                with lock:
                    counts["requests"] += 1
                    counts["disconnected"] += leaves
                    counts["errors"] += error
                    counts["wrong_answers"] += wrong

        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client, range(clients)))
        stats = json.loads(urllib.request.urlopen(url + "/v1/stats").read())
        rss_end = resident_mib()
    return {
        "seconds": seconds,
        "clients": clients,
        **counts,
        "rss_start_mib": rss_start,
        "rss_end_mib": rss_end,
        "rss_growth": rss_end / rss_start - 1,
        "stats": stats,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny test model: every path runs, the timings mean nothing")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument(
        "--clients", default="16,64", help="concurrent clients of the server runs, comma-separated (default: 16,64)"
    )
    parser.add_argument("--stagger", type=float, default=0.05, help="seconds between two clients' arrivals")
    parser.add_argument(
        "--scheduler",
        choices=["both", "continuous", "static"],
        default="both",
        help="the server's scheduler: continuous batching, static (a batch admits rows only when empty), or both",
    )
    parser.add_argument(
        "--soak", type=float, metavar="SECONDS", help="also a soak of 16 clients for SECONDS (a fifth disconnect mid-stream)"
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--fused", action="store_true", help="also mixed batches through the fused_lora Triton kernel (needs CUDA and triton)"
    )
    args = parser.parse_args()
    if args.fused and not torch.cuda.is_available():
        parser.exit(
            2,
            "bench_serving.py: --fused measures the fused_lora Triton kernel, which needs a CUDA device, and none is available; "
            "run without --fused to measure the eager paths\n",
        )
    if args.fused and importlib.util.find_spec("triton") is None:
        parser.exit(2, 'bench_serving.py: --fused needs Triton: pip install "ftengine[gpu]"\n')
    if args.threads:
        torch.set_num_threads(args.threads)
    from ftengine.inference import set_adapter
    from ftengine.serving import AdapterServer

    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            from ftengine.testing import save_tiny_model

            # Enough tokens and close enough arrivals that a warm tiny model's requests overlap.
            model, r, tokens, clients = str(save_tiny_model(Path(tmp) / "tiny")), 4, min(args.tokens, 16), [4]
            args.stagger = min(args.stagger, 0.01)
        else:
            model, r, tokens, clients = "default", 16, args.tokens, [int(c) for c in args.clients.split(",")]
        paths = make_adapters(model, Path(tmp) / "adapters", 8, r, args.smoke)
        server = AdapterServer(model, {}, plugins=["lora", "fused_lora"] if args.fused else ["lora"], max_batch_size=16)
        server.eos_ids = set()  # every row decodes exactly --tokens tokens
        loads = []
        for name, path in paths.items():
            start = time.perf_counter()
            server.load(name, path)
            loads.append(time.perf_counter() - start)
        names = list(paths)
        swap_ms = median_ms(lambda: [set_adapter(server.model, server.pm, n) for n in names], 20) / len(names)
        set_adapter(server.model, server.pm, None)

        def set_rows_ms():
            return median_ms(lambda: [server._set_rows([names[(i + j) % 8] for i in range(8)]) for j in range(8)], 20) / 8

        with RowsKernels(server, on=False):  # eager: the rows grouped by adapter (index tensors)
            rows_ms = set_rows_ms()
        rows_fused_ms = set_rows_ms() if args.fused else None  # the kernel reads the stacks: slots only
        server._set_rows(None)
        memory = {
            "adapter_parameters_mib": adapter_bytes(server.model, "a0") / 2**20,
            "stacked_copies_mib_per_adapter": stack_bytes(server.model) / 2**20 / len(names),
        }
        prompt_ids = server.tokenizer("The quick brown fox jumps over the lazy dog. " * 4)["input_ids"][:32]
        configurations = ["base", "one adapter", "mixed 1", "mixed 2", "mixed 4", "mixed 8", "grouped", "naive"]
        fused = None
        if args.fused:
            from ftengine.plugins.fused_lora import rows_summary

            configurations += ["mixed 1 fused", "mixed 2 fused", "mixed 4 fused", "mixed 8 fused"]
            fused = {"summary": rows_summary(server.model), "greedy_tokens_match": fused_tokens_match(server, prompt_ids, tokens)}
            print(fused["summary"], flush=True)
            print(f"fused and eager mixed batches give the same greedy tokens: {fused['greedy_tokens_match']}", flush=True)
        decode_rows = []
        for configuration in configurations:
            decode_rows.append(decode_speed(server, prompt_ids, tokens, configuration))
            print(f"{configuration:>13}: {decode_rows[-1]['decode_tokens_per_s']:8.1f} decode tokens/s", flush=True)
        speed = {row["configuration"]: row["decode_tokens_per_s"] for row in decode_rows}
        idle = idle_server(server, tokens)
        schedulers = [True, False] if args.scheduler == "both" else [args.scheduler == "continuous"]
        served = []
        for count in clients:
            for continuous in schedulers:
                served.append(serve_clients(server, count, tokens, continuous, args.stagger))
                print(
                    f"server, {count} clients, {served[-1]['scheduler']}: {served[-1]['tokens_per_s']:.1f} tokens/s, "
                    f"latency p50 {served[-1]['latency_p50_s']:.2f} s p95 {served[-1]['latency_p95_s']:.2f} s, "
                    f"ttft p50 {served[-1]['ttft_p50_s']:.2f} s p95 {served[-1]['ttft_p95_s']:.2f} s",
                    flush=True,
                )
        soaked = soak(server, args.soak, 16 if not args.smoke else 5, tokens) if args.soak else None

    goals = [
        {
            "goal": "mixed 8 rows / 4 adapters >= 0.8x one-adapter batch",
            "ratio": speed["mixed 4"] / speed["one adapter"],
            "target": 0.8,
        },
        {
            "goal": "mixed 8 rows / 4 adapters >= 3x naive (batch 1, swap each)",
            "ratio": speed["mixed 4"] / speed["naive"],
            "target": 3.0,
        },
        {"goal": "adapter swap < 1 ms", "ms": swap_ms, "target": 1.0},
    ]
    by_run = {(run["scheduler"], run["clients"]): run for run in served}
    if ("continuous", clients[0]) in by_run and ("static", clients[0]) in by_run:
        goals.append(
            {
                "goal": f"continuous batching >= 2x the static scheduler's throughput at {clients[0]} clients",
                "ratio": by_run["continuous", clients[0]]["tokens_per_s"] / by_run["static", clients[0]]["tokens_per_s"],
                "target": 2.0,
            }
        )
    if ("continuous", clients[0]) in by_run:
        budget = idle["ttft_s"] + 2 * idle["decode_step_s"]
        goals.append(
            {
                "goal": f"p95 time to first token at {clients[0]} clients <= idle prefill + 2 decode steps ({budget:.3f} s)",
                "ms": 1000 * by_run["continuous", clients[0]]["ttft_p95_s"],
                "target": 1000 * budget,
            }
        )
    if args.fused:
        fused["speedup_over_eager"] = {f"mixed {k}": speed[f"mixed {k} fused"] / speed[f"mixed {k}"] for k in (1, 2, 4, 8)}
        goals.append(
            {
                "goal": "mixed 8 rows / 4 adapters through the fused kernel >= 0.8x one-adapter batch",
                "ratio": speed["mixed 4 fused"] / speed["one adapter"],
                "target": 0.8,
            }
        )
    for goal in goals:
        goal["met"] = goal["ratio"] >= goal["target"] if "ratio" in goal else goal["ms"] < goal["target"]
    result = {
        "smoke": args.smoke,
        "model": model if not args.smoke else "tiny",
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
        "r": r,
        "tokens": tokens,
        "adapter_load_ms_median": 1000 * statistics.median(loads),
        "swap_active_adapter_ms": swap_ms,
        "set_adapter_rows_ms": rows_ms,
        "set_adapter_rows_fused_ms": rows_fused_ms,
        "memory": memory,
        "decode": decode_rows,
        "fused": fused,
        "server": served,
        "idle_server": idle,
        "soak": soaked,
        "goals": goals,
    }
    suffix = " (smoke run: not meaningful)" if args.smoke else ""
    fused_rows = "" if rows_fused_ms is None else f" (fused: {rows_fused_ms:.3f} ms)"
    print(
        f"adapter load {result['adapter_load_ms_median']:.1f} ms, swap {swap_ms:.3f} ms, set rows {rows_ms:.3f} ms{fused_rows}{suffix}"
    )
    print(
        f"memory per adapter: {memory['adapter_parameters_mib']:.2f} MiB parameters + {memory['stacked_copies_mib_per_adapter']:.2f} MiB stacked"
    )
    print(f"idle server: first token {idle['ttft_s']:.3f} s, then {idle['decode_step_s']:.3f} s per token{suffix}")
    if soaked:
        print(
            f"soak {soaked['seconds']:.0f} s: {soaked['requests']} requests ({soaked['disconnected']} disconnected), "
            f"{soaked['errors']} errors, {soaked['wrong_answers']} answers unlike offline greedy, "
            f"resident memory {100 * soaked['rss_growth']:+.1f}%{suffix}"
        )
    for goal in goals:
        value = f"{goal['ratio']:.2f}x" if "ratio" in goal else f"{goal['ms']:.3f} ms"
        print(f"goal: {goal['goal']}: {value} -> {'met' if goal['met'] else 'NOT met'}{suffix}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
