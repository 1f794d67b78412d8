"""The default job's adapter exported to GGUF and read back by transformers' own GGUF loader.

    python examples/benchmarks/check_export_default.py runs/default/final --work check-export --out check_export.json

Merges the adapter into the default base in full precision (``ftengine.inference.merged_model``,
as ``ftengine export`` does), writes one GGUF per ``--types`` (``write_gguf``, timed; the merge is
timed apart, once), and loads each file back with ``AutoModelForCausalLM.from_pretrained(dir,
gguf_file=...)`` and the tokenizer transformers builds from the file. On the first ``--prompts``
rows of the default job's evaluation set (``valid.jsonl``, rendered as the contacts evaluation
renders them) it compares, against the merged model:

* the prompt token ids (each model is prompted through its own tokenizer);
* the greedy answer tokens (one prompt at a time, no padding; stopped as the contacts evaluation
  stops: at a stop token, a newline or ``--max-new-tokens``). Where they differ, the first token
  that differs and the logit margins of both models there, with the merged answer as the prefix:
  a margin near zero is a near-tie that rounding flipped;
* the logits on the merged model's answers (teacher-forced): max and mean absolute difference
  over the positions that predict the answer tokens, against ``LOGIT_TOLERANCE``;
* with llama-cpp-python installed and f32 before them in ``--types``, each quantised file's
  tensors against those llama.cpp's own quantiser (``llama_model_quantize``, i.e.
  ``llama-quantize``) writes from the f32 file: how many are byte-identical.

The exit status is 1 when an f32/f16/bf16 answer differs other than at a near-tie of the merged
model (``NEAR_TIE``), a type's logits exceed its ``LOGIT_TOLERANCE``, or a quantised tensor is
not llama.cpp's. One torch thread.
"""

import argparse
import ctypes
import importlib.util
import json
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import torch
from ftengine.checkpoint import atomic_write_text
from ftengine.data import encode_chat_text, read_jsonl
from ftengine.inference import merged_model
from ftengine.modeling import stop_token_ids
from ftengine.plugins.export import gguf_file_name
from ftengine.plugins.export.gguf_model import write_gguf
from ftengine_contacts import prompts_of
from ftengine_contacts.default_job import data_dir, write_data
from transformers import AutoModelForCausalLM, AutoTokenizer

ROUNDED = ("f32", "f16", "bf16")  # greedy tokens must equal the merged model's
#: Bounds on the (max, mean) |logit difference| from the merged model on the answers' positions,
#: about twice what the default job's adapter measured (docs/benchmarks.md, "Export"): f16
#: (0.045, 0.0049), bf16 (0.41, 0.036), q8_0 (1.65, 0.13), q4_0 (19.2, 2.56): q4_0's step is
#: 127/8 = 16x q8_0's, its error 20x. f32 holds the merged model's weights exactly. q4_1
#: (35.5, 5.25) rounds the weights back towards the grid of the base's own Q4_1 GGUF, which
#: erases most of the fine-tune: its bound catches a broken writer, not a usable export.
LOGIT_TOLERANCE = {
    "f32": (0.0, 0.0),
    "f16": (0.1, 0.01),
    "bf16": (1.0, 0.08),
    "q8_0": (3.5, 0.3),
    "q4_0": (40.0, 5.0),
    "q4_1": (70.0, 10.5),
}
#: A merged-model logit margin below this between its token and another is a near-tie, which
#: rounding the weights to f16/bf16 may flip without the export being wrong.
NEAR_TIE = 0.05


def greedy_tokens(model, tokenizer, prompt_ids, max_new_tokens):
    """The greedy answer token ids to one prompt, stopped as ``ftengine_contacts.predict`` stops."""
    with torch.no_grad():
        output = model.generate(
            input_ids=torch.tensor([prompt_ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_token_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            stop_strings=["\n"],
            tokenizer=tokenizer,
        )
    return output[0, len(prompt_ids) :].tolist()


def answer_logits(model, prompt_ids, answer_ids):
    """Logits at the positions that predict each answer token, the answer teacher-forced."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + answer_ids])).logits[0]
    return logits[len(prompt_ids) - 1 : len(prompt_ids) + len(answer_ids) - 1]


def first_difference(tokenizer, reference_ids, ids, reference_logits, logits):
    """Where the answers ``ids`` and ``reference_ids`` part: the index, the two tokens and each
    model's logit margin for its own token over the other's there (``None`` if one answer is a
    prefix of the other, i.e. one stopped first)."""
    index = next((i for i, (a, b) in enumerate(zip(reference_ids, ids)) if a != b), None)
    if index is None:
        return {"index": min(len(ids), len(reference_ids)), "stopped_first": len(ids) < len(reference_ids)}
    ours, theirs = reference_ids[index], ids[index]
    return {
        "index": index,
        "merged_token": tokenizer.decode([ours]),
        "export_token": tokenizer.decode([theirs]),
        "merged_margin": (reference_logits[index, ours] - reference_logits[index, theirs]).item(),
        "export_margin": (logits[index, theirs] - logits[index, ours]).item(),
    }


def same_tensors_as_llama_quantize(f32_path, path, type_name):
    """``(same, total)``: how many of the tensors of ``path`` are byte-identical to llama.cpp's own
    quantisation of ``f32_path`` to ``type_name``, of how many."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name.upper()}")
    params.nthread = 1
    theirs_path = path.with_name(f"llama-quantize-{path.name}")
    if llama_cpp.llama_model_quantize(str(f32_path).encode(), str(theirs_path).encode(), ctypes.byref(params)):
        raise RuntimeError(f"llama_model_quantize failed on {f32_path}")
    ours = {t.name: t for t in gguf.GGUFReader(path).tensors}
    theirs = gguf.GGUFReader(theirs_path).tensors
    same = sum(
        t.tensor_type == ours[t.name].tensor_type and np.array_equal(ours[t.name].data.view(np.uint8), t.data.view(np.uint8))
        for t in theirs
    )
    theirs_path.unlink()
    return same, len(theirs)


def check_type(path, tokenizer, prompts, merged, max_new_tokens):
    """The comparison of the GGUF at ``path``, read by transformers, with the merged model's
    ``merged`` answers (``[(prompt ids, answer ids, answer logits)]``)."""
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    their_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    result = {"load_seconds": time.perf_counter() - start, "same_prompt_ids": 0, "same_answers": 0, "differences": []}
    max_difference, total, count = 0.0, 0.0, 0
    for index, (prompt, (prompt_ids, reference_ids, reference_logits)) in enumerate(zip(prompts, merged)):
        their_prompt_ids = their_tokenizer(str(prompt), add_special_tokens=False)["input_ids"]
        result["same_prompt_ids"] += their_prompt_ids == prompt_ids
        ids = greedy_tokens(model, their_tokenizer, their_prompt_ids, max_new_tokens)
        logits = answer_logits(model, prompt_ids, reference_ids)
        difference = (logits - reference_logits).abs()
        max_difference = max(max_difference, difference.max().item())
        total, count = total + difference.sum().item(), count + difference.numel()
        if ids == reference_ids:
            result["same_answers"] += 1
        else:
            where = first_difference(tokenizer, reference_ids, ids, reference_logits, logits)
            result["differences"].append({"prompt": index, **where})
    result |= {"max_logit_difference": max_difference, "mean_logit_difference": total / count}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("adapter", type=Path, help="the default job's adapter (runs/default/final)")
    parser.add_argument("--model", default="default", help="the base model (default: the default job's)")
    parser.add_argument("--types", nargs="+", choices=list(LOGIT_TOLERANCE), default=["f32", "f16", "bf16", "q8_0", "q4_0"])
    parser.add_argument("--prompts", type=int, default=20, help="rows of the evaluation set (valid.jsonl)")
    parser.add_argument("--max-new-tokens", type=int, default=80, help="the default job's contacts.max_new_tokens")
    parser.add_argument("--work", type=Path, default=Path("check-export"), help="where the GGUF files go")
    parser.add_argument("--out", type=Path, default=Path("check_export.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # the benchmark machine is shared

    write_data(data_dir())
    rows = [row for row, _ in read_jsonl(data_dir() / "valid.jsonl")][: args.prompts]
    start = time.perf_counter()
    model, tokenizer = merged_model(args.model, args.adapter, full_precision=True)
    result = {"merge_seconds": time.perf_counter() - start, "merged_dtype": str(model.dtype), "prompts": len(rows)}
    prompts = prompts_of(tokenizer, rows)
    merged = []
    for prompt in prompts:
        prompt_ids = encode_chat_text(tokenizer, prompt)["input_ids"]
        answer_ids = greedy_tokens(model, tokenizer, prompt_ids, args.max_new_tokens)
        merged.append((prompt_ids, answer_ids, answer_logits(model, prompt_ids, answer_ids)))
    print(f"merged: {result}", flush=True)

    args.work.mkdir(parents=True, exist_ok=True)
    failed = []
    result["types"] = {}
    for type_name in args.types:
        path = args.work / gguf_file_name(type_name)
        start = time.perf_counter()
        other_types = write_gguf(model, tokenizer, path, type_name, name="contacts")
        entry = {"write_seconds": time.perf_counter() - start, "bytes": path.stat().st_size, "other_types": other_types}
        entry |= check_type(path, tokenizer, prompts, merged, args.max_new_tokens)
        if type_name.startswith("q") and "f32" in result["types"] and importlib.util.find_spec("llama_cpp"):
            same, total = same_tensors_as_llama_quantize(args.work / gguf_file_name("f32"), path, type_name)
            entry["same_tensors_as_llama_quantize"] = f"{same}/{total}"
            if same != total:
                failed.append(f"{type_name}: {total - same} of {total} tensors differ from llama.cpp's quantisation")
        result["types"][type_name] = entry
        print(type_name, json.dumps(entry), flush=True)
        measured = (entry["max_logit_difference"], entry["mean_logit_difference"])
        if any(value > bound for value, bound in zip(measured, LOGIT_TOLERANCE[type_name])):
            failed.append(f"{type_name}: (max, mean) logit difference {measured} > {LOGIT_TOLERANCE[type_name]}")
        flips = [d for d in entry["differences"] if d.get("merged_margin", NEAR_TIE) >= NEAR_TIE]
        if type_name in ROUNDED and flips:
            failed.append(f"{type_name}: {len(flips)} answers differ other than by a near-tie: {flips}")
    atomic_write_text(args.out, json.dumps(result, indent=2))
    for failure in failed:
        print("FAILED", failure)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
