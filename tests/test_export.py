"""``ftengine export``: merged models as GGUF and safetensors, judged by transformers' own GGUF
reader, which loads what llama.cpp loads (names, permuted q/k rows, types, tokenizer metadata).

Tiny models of three architectures (hidden 32, a multiple of the q types' 32-value block).
"""

import errno
import json

import gguf
import pytest
import torch
from click.testing import CliRunner
from ftengine.adapters import record_base, write_base
from ftengine.build import configure
from ftengine.cli import cli
from ftengine.errors import AdapterError, FtengineError, StorageError
from ftengine.inference import merge_adapter, merged_model
from ftengine.loop import train
from ftengine.plugins import export
from ftengine.plugins.export import export_model, gguf_file_name
from ftengine.plugins.export.gguf_model import ExportError, write_gguf
from ftengine.testing import sft_rows, tiny_base, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = ["Reverse: alpha", "Hi!", "What is 2+2?", "Name a city.", "ok"]
NEW_TOKENS = 8
# Max |logit difference| from the unrounded merged model over the prompts' positions, measured
# on these tiny random models (logits of std ~1.1; random weights amplify every rounding, so
# even f16 flips argmax ties of margin ~0.001): f16 0.037, bf16 0.23, q8_0 0.87, q4_0 5.5.
# The bounds leave about 2x room; the exact checks are the weights read back.
LOGIT_ATOL = {"f16": 0.1, "bf16": 0.5, "q8_0": 2.0, "q4_0": 11.0}


def peft_adapter(base, path, name):
    """A PEFT LoRA adapter over ``base`` with random (non-zero) A and B, and its base record."""
    from peft import LoraConfig, get_peft_model

    record_base(base, name)
    torch.manual_seed(1)
    wrapped = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_" in n:
                p.normal_(0.0, 0.3)
    wrapped.save_pretrained(path)
    write_base(path, base)
    return path


@pytest.fixture(scope="module", autouse=True)
def export_command_registered():
    """The ``ftengine`` group with every plugin's commands, as ``ftengine.cli.main`` builds it."""
    from ftengine.cli import _register_plugin_commands

    _register_plugin_commands()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_base(path, "llama")
    return path


@pytest.fixture(scope="module")
def lora_run(llama_dir, tmp_path_factory):
    """A finished LoRA run on a tiny Llama: config.json, metrics.jsonl, final/."""
    work = tmp_path_factory.mktemp("export-run")
    config, pm = configure(
        None,
        ["lora"],
        [
            f"model={llama_dir}",
            f"data.train={write_jsonl(work / 'train.jsonl', sft_rows(8))}",
            f"data.eval={write_jsonl(work / 'eval.jsonl', sft_rows(4, seed=1))}",
            f"output_dir={work / 'run'}",
            "train.max_steps=3",
            "train.batch_size=4",
            "train.lr=0.05",
        ],
    )
    train(config, pm)
    return work / "run"


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def merged(request, lora_run, llama_dir, tmp_path_factory):
    """``(model type, merged model, tokenizer)``: the LoRA run's (llama), or a PEFT adapter's
    over a tiny qwen2 (tied embeddings, q/k/v biases) or mistral base."""
    model_type = request.param
    if model_type == "llama":
        model, tokenizer = merged_model(str(llama_dir), lora_run / "final", full_precision=True)
    else:
        work = tmp_path_factory.mktemp(model_type)
        base = tiny_base(work / "base", model_type, tie=model_type == "qwen2")
        adapter = peft_adapter(base, work / "adapter", str(work / "base"))
        model, tokenizer = merged_model(str(work / "base"), adapter, full_precision=True)
    return model_type, model, tokenizer


def read_back(path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def chat_texts(tokenizer):
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROMPTS
    ]


def logits(model, tokenizer):
    batch = tokenizer(chat_texts(tokenizer), return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        return model(**batch).logits[batch["attention_mask"].bool()]


def greedy_ids(model, tokenizer):
    tokenizer.padding_side = "left"
    batch = tokenizer(chat_texts(tokenizer), return_tensors="pt", padding=True, add_special_tokens=False)
    return model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)


def stored_as(model, type_name, other_types):
    """A copy of ``model`` whose matrices went through ``type_name`` (and back to float32) as the
    GGUF stores them: what a reader of the file must get exactly."""
    import copy

    from ftengine.plugins.export.gguf_model import TYPES

    names = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight"}
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.dim() > 1:
                kind = other_types.get(names.get(name), type_name)
                qtype = gguf.GGMLQuantizationType[kind.upper()] if kind != type_name else TYPES[type_name][0]
                data = gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), qtype), qtype)
                p.copy_(torch.from_numpy(data.astype("float32")))
    return rounded


@pytest.mark.parametrize("type_name", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_transformers_reads_back_exactly_what_was_written(merged, type_name, tmp_path):
    model_type, model, tokenizer = merged
    path = tmp_path / gguf_file_name(type_name)
    other_types = write_gguf(model, tokenizer, path, type_name)
    ours, their_tokenizer = read_back(path)
    assert ours.config.model_type == ("qwen2" if model_type == "qwen2" else "llama")  # llama.cpp runs mistral as llama
    texts = chat_texts(tokenizer)
    assert chat_texts(their_tokenizer) == texts  # the chat template travels in the file
    assert their_tokenizer(texts)["input_ids"] == tokenizer(texts, add_special_tokens=False)["input_ids"]
    reference = stored_as(model, type_name, other_types)
    for (name, theirs), expected in zip(ours.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(theirs, expected), name  # q/k rows un-permuted, types as written
    assert torch.equal(greedy_ids(ours, their_tokenizer), greedy_ids(reference, tokenizer))
    if type_name == "f32":
        assert torch.equal(greedy_ids(ours, their_tokenizer), greedy_ids(model, tokenizer))
    else:
        difference = (logits(ours, their_tokenizer) - logits(model, tokenizer)).abs().max().item()
        assert 0 < difference < LOGIT_ATOL[type_name]


def test_gguf_follows_llama_cpp_conventions(merged, tmp_path):
    model_type, model, tokenizer = merged
    path = tmp_path / "model.gguf"
    other_types = write_gguf(model, tokenizer, path, "q4_0")
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert ("output.weight" in tensors) == (model_type != "qwen2")  # tied embeddings: no output head
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    head = "token_embd.weight" if model_type == "qwen2" else "output.weight"
    assert other_types == {head: "q8_0"}
    fields = {name: reader.get_field(name).contents() for name in ("general.architecture", "tokenizer.ggml.model")}
    assert fields == {"general.architecture": "qwen2" if model_type == "qwen2" else "llama", "tokenizer.ggml.model": "gpt2"}
    assert reader.get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_Q4_0
    if model_type != "qwen2":  # llama.cpp rotates interleaved pairs: q rows are permuted, v rows are not
        q = torch.from_numpy(reader.get_tensor(list(tensors).index("blk.0.attn_q.weight")).data.copy())
        assert not torch.equal(q, torch.zeros_like(q))
        f32 = tmp_path / "f32.gguf"
        write_gguf(model, tokenizer, f32, "f32")
        f32_reader = gguf.GGUFReader(f32)
        raw = {t.name: torch.from_numpy(t.data.copy()) for t in f32_reader.tensors}
        attention = model.model.layers[0].self_attn
        assert torch.equal(raw["blk.0.attn_v.weight"], attention.v_proj.weight)
        assert not torch.equal(raw["blk.0.attn_q.weight"], attention.q_proj.weight)
        assert torch.equal(raw["blk.0.attn_q.weight"].sort(0).values, attention.q_proj.weight.sort(0).values)


# --------------------------------------------------------------------------------------------
# the command, end to end
# --------------------------------------------------------------------------------------------


def test_export_command_writes_the_gguf_and_a_model_card_from_the_run(lora_run, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["export", str(lora_run), "--type", "q8_0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model-q8_0.gguf"]
    card = (out / "README.md").read_text()
    metrics = [json.loads(line) for line in (lora_run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in metrics if "eval_loss" in r][-1]
    assert "- steps trained: 3" in card
    assert f"| loss | {final['eval_loss']:.4g} |" in card
    assert "training data sha256: `" in card and "peft_type LORA" in card


def test_safetensors_export_is_the_merged_model(lora_run, llama_dir, tmp_path):
    written = export_model(lora_run / "final", tmp_path / "st", format="safetensors")
    assert {p.name for p in written} >= {"README.md", "config.json", "model.safetensors", "tokenizer.json"}
    model, _ = merged_model(str(llama_dir), lora_run / "final")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "st")
    for (name, ours), theirs in zip(exported.state_dict().items(), model.state_dict().values()):
        assert torch.equal(ours, theirs), name


def test_qlora_adapter_merges_into_the_full_precision_base_not_its_4bit_copy(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    write_jsonl(tmp_path / "train.jsonl", sft_rows(8))
    config, pm = configure(
        None,
        ["lora", "qlora"],
        [
            f"model={tiny_model_dir}",
            f"data.train={tmp_path / 'train.jsonl'}",
            f"output_dir={tmp_path / 'run'}",
            "train.max_steps=2",
            "train.batch_size=4",
            "train.lr=0.05",
            "qlora.blocksize=32",
            "lora.target_modules=[q_proj]",
        ],
    )
    train(config, pm)
    adapter = tmp_path / "run" / "final"
    export_model(tmp_path / "run", tmp_path / "full", format="safetensors")
    requantised_dir = merge_adapter(str(tiny_model_dir), adapter, tmp_path / "requantised")  # ftengine merge: as trained

    key = "model.layers.0.self_attn.q_proj.weight"
    lora = load_file(adapter / "adapter_model.safetensors")
    a, b = (lora[f"base_model.model.{key.removesuffix('.weight')}.lora_{x}.weight"] for x in "AB")
    scale = config.lora.alpha / config.lora.r
    expected = load_file(tiny_model_dir / "model.safetensors")[key] + scale * b @ a
    full_error = (load_file(tmp_path / "full" / "model.safetensors")[key] - expected).abs().max().item()
    requantised_error = (load_file(requantised_dir / "model.safetensors")[key] - expected).abs().max().item()
    assert full_error < 1e-6  # base + s·B·A at fp32 rounding
    assert requantised_error > 0.01  # the NF4 round trip of the base (weights ~N(0, 0.2))


# --------------------------------------------------------------------------------------------
# refused before work, nothing half-written
# --------------------------------------------------------------------------------------------


def refusal(args):
    result = CliRunner().invoke(cli, ["export", *map(str, args)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output


def test_unsupported_architecture_is_refused_before_loading(lora_run, tmp_path):
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))  # no weights: it must not get that far
    output = refusal([lora_run, "--model", other, "--out", tmp_path / "out"])
    assert "architecture 'gpt2' cannot be exported to GGUF; supported: llama, mistral, qwen2" in output


def test_non_empty_out_without_overwrite_is_refused_and_kept(lora_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert "pass --overwrite" in refusal([lora_run, "--out", out])
    assert (out / "mine.txt").read_text() == "keep"


def test_adapter_for_another_base_is_refused_with_strict(lora_run, tmp_path):
    other = tmp_path / "other"
    tiny_base(other, "llama", seed=1)
    with pytest.raises(AdapterError, match="was trained on base model"):
        export_model(lora_run, tmp_path / "out", model=str(other), strict=True)
    assert not (tmp_path / "out").exists()


def test_a_source_that_is_no_adapter_is_refused(tmp_path):
    assert "neither an adapter directory" in refusal([tmp_path, "--out", tmp_path / "out"])


def test_a_full_disk_leaves_the_earlier_export_intact(lora_run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.gguf").write_text("earlier export")

    def disk_full(writer, **kwargs):
        writer.fout[0].write(b"partial tensor data")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(StorageError, match="no space left on device.*intact"):
        export_model(lora_run, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["earlier.gguf"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_plugin_declares_the_api_and_registers_its_command():
    assert export.ftengine_plugin_api == 1
    assert issubclass(ExportError, FtengineError)
    assert cli.commands["export"] is export.export_command
