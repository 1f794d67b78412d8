"""GGUF exports judged by llama.cpp itself, and the GGUF LoRA (``--lora-only``).

The llama.cpp tests need ``llama-cpp-python``, built from its sdist (minutes on a CPU), which CI
does not build: they are skipped without it; ``make test-export`` builds it (a cached wheel)
and runs them. The LoRA file's layout is checked without llama.cpp, against the exported base
and merged models' tensors.
"""

import numpy as np
import pytest
import torch
from ftengine.adapter_contract import AdapterContract
from ftengine.data import encode_chat_text, render_prompt
from ftengine.errors import AdapterError
from ftengine.inference import load_for_inference
from ftengine.loop import save
from ftengine.methods import adapter_methods
from ftengine.modeling import stop_token_ids
from ftengine.plugins.export.gguf_model import write_gguf
from ftengine.plugins.export.lora_gguf import write_lora_gguf
from ftengine.testing import greedy_without_cache, tiny_base
from transformers import AutoModelForCausalLM

PROMPTS = ["Reverse: alpha", "Hello, who are you?", "3 + 4 ="]
NEW_TOKENS = 8


def saved_adapter(model_dir, path, plugins, **options):
    """An adapter made by ftengine with every parameter moved from its init."""
    contract = AdapterContract()
    contract.plugins, contract.overrides = plugins, options
    run = contract.build(model_dir, path)
    contract.perturb(run.model, run.info["trainable"])
    return save(run.model, run.tokenizer, run.config, run.pm, path / "adapter")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_base(path, "llama")
    return path


@pytest.fixture(scope="module")
def exported(base_dir, tmp_path_factory):
    """A LoRA adapter (rsLoRA, so its scale is not alpha / r) on every linear layer, written as
    a GGUF LoRA, with the base and the merged model as f32 and f16 GGUFs: ``{name: path}``,
    plus ``merged`` (the merged transformers model) and ``tokenizer``."""
    out = tmp_path_factory.mktemp("export")
    adapter = saved_adapter(base_dir, out, ["lora"], lora={"r": 4, "alpha": 8, "rslora": True})
    model, tokenizer, pm = load_for_inference(str(base_dir), {"contacts": adapter})
    files = {"lora": write_lora_gguf(out / "lora.gguf", model, pm, "contacts")}
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    for type_name in ("f32", "f16"):
        write_gguf(base, tokenizer, out / f"base-{type_name}.gguf", type_name)
    methods = adapter_methods(pm)
    methods.merge(model)
    merged = methods.unwrap(model)
    for type_name in ("f32", "f16"):
        write_gguf(merged, tokenizer, out / f"merged-{type_name}.gguf", type_name)
        files[f"base-{type_name}"] = out / f"base-{type_name}.gguf"
        files[f"merged-{type_name}"] = out / f"merged-{type_name}.gguf"
    return files | {"merged": merged, "tokenizer": tokenizer}


def gguf_tensors(path):
    import gguf

    reader = gguf.GGUFReader(path)
    return reader, {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}


def test_the_lora_gguf_holds_the_update_of_each_base_tensor(exported):
    """In llama.cpp's layout (names, shapes, q/k rows permuted like the base's), base + alpha/r ·
    B A is the merged model's tensor, for every tensor the adapter changes."""
    reader, lora = gguf_tensors(exported["lora"])
    _, base = gguf_tensors(exported["base-f32"])
    _, merged = gguf_tensors(exported["merged-f32"])
    assert reader.get_field("general.type").contents() == "adapter"
    assert reader.get_field("adapter.type").contents() == "lora"
    alpha = reader.get_field("adapter.lora.alpha").contents()
    updated = sorted(name.removesuffix(".lora_a") for name in lora if name.endswith(".lora_a"))
    assert len(updated) == 2 * 7  # every linear layer of both blocks
    assert "blk.0.attn_q.weight" in updated and "blk.1.attn_k.weight" in updated
    for name in updated:
        a, b = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
        assert a.shape[0] == b.shape[1] == 4
        np.testing.assert_allclose(base[name] + alpha / 4 * b @ a, merged[name], atol=1e-5, err_msg=name)
    unchanged = set(base) - set(updated)
    assert all(np.array_equal(base[name], merged[name]) for name in unchanged)


def test_a_method_without_lora_factors_is_refused_by_name(tiny_model_dir, tmp_path):
    adapter = saved_adapter(tiny_model_dir, tmp_path, ["prompt_tuning"], prompt_tuning={"num_virtual_tokens": 2})
    model, _, pm = load_for_inference(str(tiny_model_dir), {"prompt": adapter})
    message = "method PromptTuningMethod of plugin 'prompt_tuning' cannot write its adapter as a LoRA"
    with pytest.raises(AdapterError, match=message):
        adapter_methods(pm).check_lora_export(adapter)  # before weights load, for the export command
    with pytest.raises(AdapterError, match=message):
        write_lora_gguf(tmp_path / "lora.gguf", model, pm, "prompt")
    assert not (tmp_path / "lora.gguf").exists()


def test_a_dora_adapter_is_refused_by_name(tiny_model_dir, tmp_path):
    adapter = saved_adapter(tiny_model_dir, tmp_path, ["lora", "dora"], lora={"r": 4})
    model, _, pm = load_for_inference(str(tiny_model_dir), {"d": adapter})
    with pytest.raises(AdapterError, match="adapter 'd' is a dora adapter: method dora cannot be written as a LoRA"):
        write_lora_gguf(tmp_path / "lora.gguf", model, pm, "d")
    assert list(tmp_path.glob("*.gguf")) == []


# --- llama.cpp ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: make test-export builds it")


def prompt_ids(tokenizer):
    return [encode_chat_text(tokenizer, render_prompt(tokenizer, [{"role": "user", "content": p}]))["input_ids"] for p in PROMPTS]


def ftengine_greedy(model, ids):
    return [greedy_without_cache(model, torch.tensor([row]), NEW_TOKENS)[0, len(row) :].tolist() for row in ids]


def llama_greedy(llm, ids):
    answers = []
    for row in ids:
        tokens = []
        for token in llm.generate(row, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            tokens.append(token)
            if len(tokens) == NEW_TOKENS:
                break
        answers.append(tokens)
    return answers


def open_llama(llama_cpp, path, **kwargs):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, seed=0, verbose=False, **kwargs)


def rounded_to_f16(model):
    """The merged model with its matrices as an f16 GGUF holds them (norms stay f32)."""
    import copy

    model = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.copy_(parameter.half().float())
    return model


def test_llama_cpp_gives_the_merged_models_greedy_tokens(llama_cpp, exported):
    ids = prompt_ids(exported["tokenizer"])
    expected = ftengine_greedy(rounded_to_f16(exported["merged"]), ids)
    assert llama_greedy(open_llama(llama_cpp, exported["merged-f16"]), ids) == expected


def test_llama_cpp_formats_a_chat_as_ftengine_and_answers_the_same(llama_cpp, exported):
    """llama-cpp-python's chat-completion path, with the template embedded in the GGUF: the same
    prompt text as ftengine's chat template, and the merged model's greedy answer up to its
    first stop token. The answer is compared as tokens (those the path fed back to the model:
    all but the last it sampled): the random tiny model writes partial UTF-8, which the path
    completes with tokens past ``max_tokens``; its text starts with those tokens' text."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    tokenizer, llm = exported["tokenizer"], open_llama(llama_cpp, exported["merged-f16"])
    formatter = Jinja2ChatFormatter(
        llm.metadata["tokenizer.chat_template"], eos_token=tokenizer.eos_token, bos_token=tokenizer.bos_token
    )
    merged, stops = rounded_to_f16(exported["merged"]), set(stop_token_ids(tokenizer))
    for prompt in PROMPTS:
        messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": prompt}]
        assert formatter(messages=messages).prompt == render_prompt(tokenizer, messages)
        ids = encode_chat_text(tokenizer, render_prompt(tokenizer, messages))["input_ids"]
        expected = ftengine_greedy(merged, [ids])[0]
        answered = next((i for i, token in enumerate(expected) if token in stops), NEW_TOKENS)
        answer = llm.create_chat_completion(messages, max_tokens=NEW_TOKENS, temperature=0.0, top_k=1, repeat_penalty=1.0)
        assert llm.input_ids[: len(ids)].tolist() == ids
        assert llm.input_ids[len(ids) :].tolist()[: answered - 1] == expected[: answered - 1]
        text = llm.detokenize(expected[:answered]).decode("utf-8", errors="ignore")
        assert answer["choices"][0]["message"]["content"].startswith(text)


def test_the_lora_applied_over_the_base_gives_the_merged_models_greedy_tokens(llama_cpp, exported):
    ids = prompt_ids(exported["tokenizer"])
    expected = ftengine_greedy(exported["merged"], ids)
    llm = open_llama(llama_cpp, exported["base-f32"], lora_path=str(exported["lora"]))
    assert llama_greedy(llm, ids) == expected
