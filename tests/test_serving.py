"""Many adapters over one base: mixed-adapter batches, sampling, stop strings, streaming."""

import pytest
import torch
from ftengine.adapter_contract import AdapterContract
from ftengine.errors import AdapterError
from ftengine.inference import set_adapter
from ftengine.loop import save
from ftengine.methods import adapter_methods
from ftengine.serving import AdapterServer, ContextLengthError, RequestError, UnknownModelError
from ftengine.testing import greedy_without_cache, save_tiny_model

# LoRA of two ranks, rsLoRA, DoRA, and an adapter on fewer layers (q/v only).
ADAPTERS = {
    "r4": (["lora"], {"r": 4}),
    "r8": (["lora"], {"r": 8, "alpha": 8}),
    "rs": (["lora"], {"r": 8, "rslora": True}),
    "dora": (["lora", "dora"], {"r": 4, "alpha": 16}),
    "qv": (["lora"], {"r": 2, "target_modules": ["q_proj", "v_proj"]}),
}
ROWS = [None, "r4", "r8", "rs", "dora", "qv", "r4", None]
PROMPTS = ["Reverse: alpha", "Hi", "Reverse: the longest prompt of the batch", "abc", "x", "Reverse: beta", "ok", "zz"]


def save_adapter(model_dir, path, plugins, overrides, seed=0, scale=0.1):
    contract = AdapterContract()
    contract.plugins, contract.overrides = plugins, overrides
    run = contract.build(model_dir, path)
    torch.manual_seed(seed)
    contract.perturb(run.model, run.info["trainable"], scale=scale)
    return save(run.model, run.tokenizer, run.config, run.pm, path / "adapter")


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: save_adapter(tiny_model_dir, root / name, plugins, {"lora": lora}) for name, (plugins, lora) in ADAPTERS.items()
    }


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapter_dirs):
    return AdapterServer(str(tiny_model_dir), adapter_dirs)


def one_at_a_time(server, name, **inputs):
    set_adapter(server.model, server.pm, name)
    try:
        return server.model(**inputs).logits
    finally:
        set_adapter(server.model, server.pm, None)


@torch.no_grad()
def test_a_mixed_batch_gives_each_row_the_logits_of_its_adapter_alone(server):
    input_ids = torch.randint(0, 256, (len(ROWS), 12), generator=torch.Generator().manual_seed(0))
    adapter_methods(server.pm).set_rows(server.model, ROWS)
    try:
        mixed = server.model(input_ids=input_ids).logits
    finally:
        adapter_methods(server.pm).set_rows(server.model, None)
    alone = torch.cat([one_at_a_time(server, name, input_ids=input_ids[i : i + 1]) for i, name in enumerate(ROWS)])
    torch.testing.assert_close(mixed, alone, atol=1e-5, rtol=0)
    # Every adapter changes the output, so a row given the wrong adapter would fail above.
    base = one_at_a_time(server, None, input_ids=input_ids)
    assert all((alone[i] - base[i]).abs().max() > 1e-3 for i, name in enumerate(ROWS) if name)


def test_mixed_greedy_generation_gives_the_tokens_of_each_adapter_alone(server):
    completions = server.generate(PROMPTS, adapters=ROWS, max_tokens=8, temperature=0)
    for prompt, name, completion in zip(PROMPTS, ROWS, completions):
        set_adapter(server.model, server.pm, name)
        try:
            prompt_ids = torch.tensor([server.encode(prompt)])
            expected = greedy_without_cache(server.model, prompt_ids, 8)[0, prompt_ids.shape[1] :].tolist()
        finally:
            set_adapter(server.model, server.pm, None)
        assert completion.finish_reason == "length" and completion.completion_tokens == 8
        assert completion.token_ids == expected, name
        assert completion.prompt_tokens == prompt_ids.shape[1] and completion.adapter == name
    assert len({tuple(c.token_ids) for c in completions}) > 4, "the adapters must answer differently"


def test_mixed_generation_matches_peft_generate_with_adapter_names(server, tiny_model_dir, adapter_dirs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = ["r4", "r8", "rs"]
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dirs["r4"], adapter_name="r4"
    )
    for name in names[1:]:
        peft_model.load_adapter(adapter_dirs[name], adapter_name=name)
    rows = ["r8", None, "r4", "rs", "r8"]
    tokenizer = server.tokenizer
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(PROMPTS[: len(rows)], return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
    output = peft_model.eval().generate(
        **batch,
        adapter_names=[name or "__base__" for name in rows],
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    expected = output[:, batch["input_ids"].shape[1] :].tolist()
    completions = server.generate(PROMPTS[: len(rows)], adapters=rows, max_tokens=6, temperature=0)
    assert [c.token_ids for c in completions] == expected


def test_a_seeded_row_samples_the_same_whatever_shares_its_batch(server):
    params = {"max_tokens": 8, "temperature": 0.9, "top_p": 0.9, "top_k": 50}
    alone = server.generate(["Hi"], adapters=["dora"], seed=7, **params)[0]
    mixed = server.generate(["Reverse: alpha", "Hi"], adapters=["r4", "dora"], seed=7, **params)[1]
    assert mixed.token_ids == alone.token_ids
    others = {tuple(server.generate(["Hi"], adapters=["dora"], seed=seed, **params)[0].token_ids) for seed in range(4)}
    assert len(others) > 1, "different seeds must sample differently"
    greedy = server.generate(["Hi"], adapters=["dora"], max_tokens=8, temperature=0)[0]
    assert server.generate(["Hi"], adapters=["dora"], max_tokens=8, top_k=1, seed=3)[0].token_ids == greedy.token_ids


def test_stop_strings_end_a_row_and_are_never_streamed(server):
    full = server.generate(PROMPTS[:2], adapters=["r4", "qv"], max_tokens=10, temperature=0)
    stop = full[0].text[3:5]
    assert stop and stop not in full[0].text[:3], "pick a stop string that first occurs after position 3"
    completions = server.generate(PROMPTS[:2], adapters=["r4", "qv"], max_tokens=10, temperature=0, stop=[stop])
    assert completions[0].text == full[0].text[:3] and completions[0].finish_reason == "stop"
    assert completions[0].completion_tokens < 10
    if stop not in full[1].text:
        assert completions[1].text == full[1].text and completions[1].finish_reason == "length"
    deltas = list(server.stream(PROMPTS[:2], adapters=["r4", "qv"], max_tokens=10, temperature=0, stop=[stop]))
    for index, completion in enumerate(completions):
        mine = [d for d in deltas if d.index == index]
        assert "".join(d.text for d in mine) == completion.text
        assert [d.finish_reason for d in mine][-1] == completion.finish_reason
        assert all(d.finish_reason is None for d in mine[:-1])
        assert sum(len(d.token_ids) for d in mine) >= len([d for d in mine if d.text])


def test_adapters_load_and_unload_by_name_while_the_server_runs(server, adapter_dirs, tmp_path):
    before = server.generate(["Hi"], adapters=["r4"], max_tokens=6, temperature=0)[0].token_ids
    server.load("again", adapter_dirs["dora"])
    assert list(server.adapters) == [*ADAPTERS, "again"]
    again = server.generate(["Hi", "Hi"], adapters=["again", "dora"], max_tokens=6, temperature=0)
    assert again[0].token_ids == again[1].token_ids
    server.unload("again")
    assert list(server.adapters) == list(ADAPTERS)
    with pytest.raises(UnknownModelError, match="the model 'again' does not exist"):
        server.generate(["Hi"], adapters=["again"])
    other = save_tiny_model(tmp_path / "wide", hidden_size=48)
    mismatched = save_adapter(other, tmp_path / "wide-adapter", ["lora"], {"lora": {"r": 4}})
    with pytest.raises(AdapterError, match="wide-adapter"):
        server.load("wide", mismatched)
    with pytest.raises(AdapterError, match="'r4' is already loaded"):
        server.load("r4", adapter_dirs["r8"])
    assert list(server.adapters) == list(ADAPTERS)
    assert server.generate(["Hi"], adapters=["r4"], max_tokens=6, temperature=0)[0].token_ids == before


@pytest.mark.parametrize(
    "params, error, message",
    [
        ({"max_tokens": 0}, RequestError, "max_tokens: 0 is not valid"),
        ({"temperature": -1}, RequestError, "temperature: -1 is not valid"),
        ({"top_p": 0}, RequestError, "top_p: 0 is not valid"),
        ({"max_tokens": 600}, ContextLengthError, "this model's context is 512 tokens"),
    ],
)
def test_bad_requests_are_refused_with_the_field_named(server, params, error, message):
    with pytest.raises(error, match=message):
        server.generate(["Hi"], adapters=["r4"], **params)


def test_a_prompt_tuning_adapter_is_refused_by_name(tiny_model_dir, tmp_path):
    contract = AdapterContract()
    contract.plugins, contract.overrides = ["prompt_tuning"], {"prompt_tuning": {"num_virtual_tokens": 3}}
    run = contract.build(tiny_model_dir, tmp_path)
    path = save(run.model, run.tokenizer, run.config, run.pm, tmp_path / "adapter")
    with pytest.raises(AdapterError, match="'tone' is a prompt-tuning adapter, which cannot share a batch"):
        AdapterServer(str(tiny_model_dir), {"tone": path})


def test_a_4bit_base_serves_mixed_batches_too(tiny_model_dir, adapter_dirs):
    pytest.importorskip("bitsandbytes")
    names = ["r4", "dora", "qv"]
    server = AdapterServer(
        str(tiny_model_dir), {n: adapter_dirs[n] for n in names}, plugins=["qlora"], sections={"qlora": {"blocksize": 32}}
    )
    assert any(type(m).__name__ == "Linear4bit" for m in server.model.modules())
    rows = [None, *names]
    completions = server.generate(PROMPTS[: len(rows)], adapters=rows, max_tokens=6, temperature=0)
    for prompt, name, completion in zip(PROMPTS, rows, completions):
        assert completion.token_ids == server.generate([prompt], adapters=[name], max_tokens=6, temperature=0)[0].token_ids
