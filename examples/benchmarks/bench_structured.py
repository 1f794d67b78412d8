"""The per-token cost of structured outputs (``ftengine.structured``, llguidance) on the default
model's tokenizer (SmolLM2-135M-Instruct, 49,152 tokens).

    python examples/benchmarks/bench_structured.py [--records 20] [--out structured.json]
    python examples/benchmarks/bench_structured.py --model path/to/model   # another tokenizer
    python examples/benchmarks/bench_structured.py --smoke      # the tiny test tokenizer: every path, meaningless timings

For each schema, valid JSON documents (contact records, compact and pretty-printed; nested
orders) are tokenized and replayed token by token through a ``Constraint``, timing at every
token: the mask (``allowed``: llguidance's bitmask, unpacked to a bool tensor over the
vocabulary), applying it to a row's logits (``masked_fill`` to -inf, what the sampling step
does) and advancing (``accept``). Also the one-off costs: the tokenizer bridge (``Vocabulary``,
once per server) and compiling a schema (once per request). Prints mean / p50 / p95 µs per token.
"""

import argparse
import json
import platform
import statistics
import time

import torch
from ftengine.plugins.hf_loader import load_tokenizer
from ftengine.structured import Constraint, Vocabulary
from ftengine.testing import tiny_tokenizer

CONTACT = {
    "type": "object",
    "properties": {
        key: {"anyOf": [{"type": kind}, {"type": "null"}]}
        for key, kind in [("name", "string"), ("age", "integer"), ("city", "string")]
    }
    | {
        "email": {"anyOf": [{"type": "string", "pattern": r"^[a-z0-9._+-]+@[a-z0-9.-]+\.[a-z]+$"}, {"type": "null"}]},
        "phone": {"anyOf": [{"type": "string", "pattern": r"^\+1[0-9]{10}$"}, {"type": "null"}]},
        "date": {"anyOf": [{"type": "string", "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}, {"type": "null"}]},
    },
    "required": ["name", "age", "city", "email", "phone", "date"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "status": {"enum": ["open", "shipped", "returned"]},
        "customer": {
            "type": "object",
            "properties": {"id": {"type": "integer"}, "vip": {"type": "boolean"}},
            "required": ["id", "vip"],
        },
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}, "size": {"enum": ["S", "M", "L"]}},
                "required": ["sku", "qty"],
            },
        },
    },
    "required": ["status", "customer", "items"],
}
NAMES = ["Ann Lee", "Torbjørn Dahl", "Kang Ji-woo", "María José van der Berg", None, "Dr Oluwaseun Adeyemi-Okafor"]
CITIES = ["Oslo", "Saint-Jean-sur-Richelieu", None, "Punxsutawney", "São Paulo"]


def contact_documents(count):
    for i in range(count):
        record = {
            "name": NAMES[i % len(NAMES)],
            "age": None if i % 4 == 3 else 20 + i,
            "city": CITIES[i % len(CITIES)],
            "email": None if i % 5 == 4 else f"user{i}.name+tag@mail{i}.example.com",
            "phone": None if i % 3 == 2 else f"+1202555{i:04d}",
            "date": None if i % 2 else f"2024-05-{1 + i % 28:02d}",
        }
        yield (
            json.dumps(record, separators=(",", ":"), ensure_ascii=False)
            if i % 2
            else json.dumps(record, indent=2, ensure_ascii=False)
        )


def order_documents(count):
    for i in range(count):
        items = [{"sku": f"SKU-{i}{j}", "qty": j + 1, "size": "SML"[j % 3]} for j in range(1 + i % 4)]
        yield json.dumps(
            {"status": ["open", "shipped", "returned"][i % 3], "customer": {"id": 1000 + i, "vip": bool(i % 2)}, "items": items}
        )


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values_s):
    micros = [v * 1e6 for v in values_s]
    return {
        "mean_us": round(statistics.fmean(micros), 1),
        "p50_us": round(percentile(micros, 0.5), 1),
        "p95_us": round(percentile(micros, 0.95), 1),
        "tokens": len(micros),
    }


def replay(prototype, tokenizer, documents, vocab_size):
    """Time mask, apply and accept at every token of every document."""
    logits = torch.randn(vocab_size)
    mask_s, apply_s, accept_s = [], [], []
    for document in documents:
        constraint = prototype.fork()
        for token in tokenizer(document, add_special_tokens=False)["input_ids"]:
            start = time.perf_counter()
            allowed = constraint.allowed(vocab_size)
            masked = time.perf_counter()
            logits.masked_fill(~allowed, float("-inf"))
            applied = time.perf_counter()
            assert allowed[token], f"the constraint refused token {token} of a valid document: {document!r}"
            constraint.accept(token)
            accept_s.append(time.perf_counter() - applied)
            mask_s.append(masked - start)
            apply_s.append(applied - masked)
    return {"mask": summary(mask_s), "apply": summary(apply_s), "accept": summary(accept_s)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="whose tokenizer (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--records", type=int, default=20, help="documents replayed per schema")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument(
        "--smoke", action="store_true", help="the tiny test tokenizer, 2 documents: every path runs, the timings mean nothing"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = tiny_tokenizer() if args.smoke else load_tokenizer(args.model)
    records = 2 if args.smoke else args.records
    vocab_size = len(tokenizer)
    start = time.perf_counter()
    vocabulary = Vocabulary(tokenizer, {tokenizer.eos_token_id})
    bridge_s = time.perf_counter() - start
    print(
        f"tokenizer: {'tiny' if args.smoke else args.model}, {vocab_size} tokens; the bridge (Vocabulary) took {bridge_s * 1000:.0f} ms (once per server)"
    )

    formats = {
        "json_object": ({"type": "json_object"}, contact_documents(records)),
        "contact record": (
            {"type": "json_schema", "json_schema": {"name": "contact", "schema": CONTACT}},
            contact_documents(records),
        ),
        "nested order": (
            {"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER}},
            order_documents(records),
        ),
    }
    results = {}
    print(f"µs per token, mean / p50 / p95\n{'format':<16} {'compile ms':>10}  {'mask':<20} {'apply':<20} {'accept':<20} tokens")
    for name, (response_format, documents) in formats.items():
        start = time.perf_counter()
        prototype = Constraint.for_response_format(response_format, vocabulary)
        compile_ms = (time.perf_counter() - start) * 1000
        result = replay(prototype, tokenizer, list(documents), vocab_size)
        results[name] = {"compile_ms": round(compile_ms, 1), **result}
        cells = [
            f"{r['mean_us']:.0f} / {r['p50_us']:.0f} / {r['p95_us']:.0f}"
            for r in (result[k] for k in ("mask", "apply", "accept"))
        ]
        print(f"{name:<16} {compile_ms:>10.1f}  {cells[0]:<20} {cells[1]:<20} {cells[2]:<20} {result['mask']['tokens']}")
    if args.smoke:
        print("(smoke run: not meaningful)")
    if args.out:
        machine = {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()}
        with open(args.out, "w") as f:
            json.dump(
                {
                    "smoke": args.smoke,
                    "model": "tiny" if args.smoke else args.model,
                    "vocab_size": vocab_size,
                    "bridge_ms": round(bridge_s * 1000),
                    **machine,
                    "formats": results,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
