"""GGUF exports of a trained adapter, run by llama.cpp on the contacts held-out rows beside ftengine.

    python examples/benchmarks/bench_export.py runs/default/final --types f16 q8_0 q4_0 --out export.json

For each type: the time to write the GGUF (after one merge, timed apart), its size, and the
held-out scores (``ftengine_contacts.task.score``) of the greedy answers llama.cpp gives with
it, beside the merged model's own answers in ftengine (``ftengine_contacts.predict``). Both
answer the same prompt tokens (ftengine's chat template) and stop as ``predict`` does: at a
stop token or after the token that writes a newline. Needs llama-cpp-python (``make
test-export`` builds it). ``--lora-only`` also times the GGUF LoRA and scores it applied over
the base's f16 GGUF. ``--prepare-only`` does all but llama.cpp's part, which a later run reuses.
``--out`` is rewritten after each type, so a run stopped early keeps the types it finished.

llama.cpp runs on ``--threads`` threads (1 by default) for both prompt and generation: its
threads wait for each other by spinning, so on a machine whose cores are busy with other work a
second thread is descheduled at every barrier; with 2 threads on the 2-core box under a load
average of 5, a held-out row took 50-105 s against 9-16 s with 1 (docs/benchmarks.md, "Export").
"""

import argparse
import json
import os
import time
from pathlib import Path

from ftengine.checkpoint import atomic_write_text
from ftengine.data import encode_chat_text, read_jsonl
from ftengine.inference import load_for_inference
from ftengine.methods import adapter_methods
from ftengine.modeling import stop_token_ids
from ftengine.plugins.export.gguf_model import write_gguf
from ftengine.plugins.export.lora_gguf import write_lora_gguf
from ftengine_contacts import predict, prompts_of, task

HELDOUT = Path(__file__).parents[1] / "contacts" / "data" / "heldout.jsonl"


def llama_answers(llm, tokenizer, rows, max_new_tokens):
    """llama.cpp's greedy answer to each row, stopped as ``ftengine_contacts.predict`` stops."""
    stops = set(stop_token_ids(tokenizer))
    answers = []
    for prompt in prompts_of(tokenizer, rows):
        tokens = []
        for token in llm.generate(encode_chat_text(tokenizer, prompt)["input_ids"], top_k=1, temp=0.0, reset=True):
            if token in stops:
                break
            tokens.append(token)
            if len(tokens) == max_new_tokens or "\n" in tokenizer.decode(tokens[-1:]):
                break
        answers.append(tokenizer.decode(tokens, skip_special_tokens=True))
    return answers


def scores(answers, rows):
    references = [json.loads(row["messages"][-1]["content"]) for row in rows]
    result = task.score(answers, references)
    return {"exact_match": result["exact_match"], "schema_valid": result["schema_valid"]}


def prepare(args, rows):
    """Merge once, answer with ftengine, write each GGUF (and the LoRA with the base's f16):
    the timings, sizes and answers, kept in ``args.work / "prepared.json"``."""
    prepared = {"rows": len(rows), "types": {}}
    start = time.perf_counter()
    model, tokenizer, pm = load_for_inference(args.model, {"adapter": str(args.adapter)})
    if args.lora_only:
        start_lora = time.perf_counter()
        lora = write_lora_gguf(args.work / "adapter-lora.gguf", model, pm, "adapter")
        prepared["lora"] = {"write_seconds": time.perf_counter() - start_lora, "bytes": lora.stat().st_size}
    methods = adapter_methods(pm)
    methods.merge(model)
    merged = methods.unwrap(model)
    prepared["merge_seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    prepared["answers"] = predict(merged, tokenizer, rows, max_new_tokens=args.max_new_tokens)
    prepared["ftengine"] = scores(prepared["answers"], rows) | {"seconds": time.perf_counter() - start}
    print("ftengine", prepared["ftengine"], flush=True)
    for type_name in args.types:
        path = args.work / f"model-{type_name}.gguf"
        start = time.perf_counter()
        write_gguf(merged, tokenizer, path, type_name)
        prepared["types"][type_name] = {"write_seconds": time.perf_counter() - start, "bytes": path.stat().st_size}
        print(type_name, prepared["types"][type_name], flush=True)
    if args.lora_only:
        base, _, _ = load_for_inference(args.model, {})
        write_gguf(base, tokenizer, args.work / "base-f16.gguf", "f16")
    (args.work / "prepared.json").write_text(json.dumps(prepared, indent=2))
    return prepared


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--model", default="default", help="the base model (default: the default job's)")
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_0"])
    parser.add_argument("--rows", type=int, default=100, help="held-out rows to score")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp's threads (see above: more can be slower)")
    parser.add_argument("--lora-only", action="store_true", help="also the GGUF LoRA, applied over the base's f16 GGUF")
    parser.add_argument("--work", type=Path, default=Path("bench-export"), help="where the GGUF files go")
    parser.add_argument("--prepare-only", action="store_true", help="stop before llama.cpp (its results reuse this)")
    parser.add_argument("--out", type=Path, default=Path("bench_export.json"))
    args = parser.parse_args()

    rows = [row for row, _ in read_jsonl(HELDOUT)][: args.rows]
    args.work.mkdir(parents=True, exist_ok=True)
    saved = args.work / "prepared.json"
    result = json.loads(saved.read_text()) if saved.exists() else prepare(args, rows)
    if args.prepare_only:
        return
    import llama_cpp
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.adapter)
    answers = result.pop("answers")[: len(rows)]
    result["ftengine_on_these_rows"] = scores(answers, rows)  # --rows may be fewer than were prepared

    def run_llama(entry, model_path, **kwargs):
        threads = {"n_threads": args.threads, "n_threads_batch": args.threads}  # the batch default is every core
        llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=1024, verbose=False, **threads, **kwargs)
        start = time.perf_counter()
        llama = llama_answers(llm, tokenizer, rows, args.max_new_tokens)
        entry |= scores(llama, rows) | {"seconds": time.perf_counter() - start, "load_average": os.getloadavg()}
        entry["same_answers_as_ftengine"] = sum(a == b for a, b in zip(llama, answers))
        entry["different_answers"] = [
            {"row": i, "ftengine": a, "llama.cpp": b} for i, (a, b) in enumerate(zip(answers, llama)) if a != b
        ]
        print(entry, flush=True)
        atomic_write_text(args.out, json.dumps(result, indent=2))

    for type_name, entry in result["types"].items():
        run_llama(entry, args.work / f"model-{type_name}.gguf")
    if "lora" in result:
        run_llama(result["lora"], args.work / "base-f16.gguf", lora_path=str(args.work / "adapter-lora.gguf"))


if __name__ == "__main__":
    main()
