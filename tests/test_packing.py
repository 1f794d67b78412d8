"""Packing (``train.packing``) is exact: a packed batch gives the summed loss and every trainable
gradient of the same examples unpacked and padded, with LoRA, full fine-tuning and QLoRA.

Each packed row restarts ``position_ids`` at every example and the batch carries no attention
mask to the model, so transformers (``masking_utils.find_packed_sequence_indices``) confines
attention to each example; the control test shows the same rows with a plain mask do differ.
"""

import pytest
import torch
from ftengine.adapter_contract import AdapterContract
from ftengine.build import build, configure
from ftengine.data import IGNORE_INDEX, collate_sft, load_sft_file, pack_examples
from ftengine.errors import ConfigError, DataError
from ftengine.loop import train
from ftengine.plugins import sft
from ftengine.rundir import LOCK_FILE
from ftengine.testing import save_tiny_model, sft_rows, write_jsonl

# fp32: the packed and padded forward passes sum the same products in other groupings (other
# matrix shapes), so they agree to rounding. Measured on a 2-core CPU: summed loss |diff| 0
# (lora, full) and 6.1e-5 = 1 ulp of ~518 (qlora); per-token gradients max |diff| <= 4.6e-7.
ATOL = 1e-5
MAX_LENGTH = 128


def varied_rows():
    """Rows of unequal lengths (so packing fills rows unevenly and batches need padding)."""
    rows = sft_rows(10, seed=3)
    for i, row in enumerate(rows):
        row["prompt"] += " please" * (i % 4)
    rows.append({"messages": [{"role": "system", "content": "Be terse."}, *_chat("Reverse: kappa", "appak")]})
    return rows


def _chat(prompt, answer):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    save_tiny_model(root / "model", hidden_size=64)  # 64: bitsandbytes' NF4 block size, for qlora
    write_jsonl(root / "train.jsonl", varied_rows())
    return root


def overrides(workdir, *extra):
    return [
        f"model={workdir / 'model'}",
        f"data.train={workdir / 'train.jsonl'}",
        f"output_dir={workdir / 'out'}",
        "train.packing=true",
        f"train.max_length={MAX_LENGTH}",
        *extra,
    ]


def loss_and_grads(model, batch, params):
    for p in params.values():
        p.grad = None
    out = sft.ftengine_compute_loss(model=model, batch=batch, state=None)
    out.loss.backward()
    return out.loss.detach(), out.count, {n: p.grad.detach().clone() for n, p in params.items()}


@pytest.mark.parametrize("plugins", [("lora",), ("full",), ("lora", "qlora")], ids=["lora", "full", "qlora"])
def test_a_packed_batch_has_the_loss_and_gradients_of_the_padded_examples(workdir, plugins):
    extra = ["lora.dropout=0", "lora.target_modules=all-linear"] if "lora" in plugins else []
    config, pm = configure(None, list(plugins), overrides(workdir, *extra))
    model, tokenizer, info = build(config, pm)
    with torch.no_grad():
        AdapterContract.perturb(model, info["trainable"])  # LoRA's B starts at zero: make every gradient non-trivial
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params

    datasets = sft.load_sft_data(config, tokenizer)
    examples, _ = load_sft_file(workdir / "train.jsonl", tokenizer, MAX_LENGTH)
    packed = collate_sft(datasets.train, tokenizer.pad_token_id)
    padded = collate_sft(examples, tokenizer.pad_token_id)
    # The packing is real: fewer rows than examples, a row with several examples, and padding.
    assert len(datasets.train) < len(examples) == 11
    assert max(len(row["sources"]) for row in datasets.train) >= 3
    assert (packed["attention_mask"] == 0).any()

    packed_loss, packed_count, packed_grads = loss_and_grads(model, packed, params)
    padded_loss, padded_count, padded_grads = loss_and_grads(model, padded, params)
    assert packed_count == padded_count > 0
    # The summed loss (~500) agrees to a unit in the last place of fp32 (6e-5 there); the loss
    # per target token, which the loop logs and steps on, within ATOL.
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-6, atol=0)
    assert abs(float(packed_loss - padded_loss)) / padded_count <= ATOL
    # The gradients the optimiser steps on: the summed loss's, divided by the target count (as the loop does).
    worst = max(float((packed_grads[n] - padded_grads[n]).abs().max()) / padded_count for n in params)
    print(f"{plugins}: |loss diff| {abs(float(packed_loss - padded_loss)):.2e}, max |grad diff| {worst:.2e}")
    assert worst <= ATOL
    assert any(float(g.abs().max()) > 1e-3 for g in padded_grads.values())

    # Control: the same packed rows with a plain causal mask let examples see each other.
    crossed = {k: v for k, v in packed.items() if k != "position_ids"}
    crossed["attention_mask"] = torch.ones_like(crossed["attention_mask"])
    crossed_loss, _, _ = loss_and_grads(model, crossed, params)
    assert abs(float(crossed_loss) - float(padded_loss)) > 1e-2


def test_packed_rows_restart_positions_and_never_learn_across_a_boundary():
    examples = [
        {"input_ids": [1, 2, 3], "labels": [1, 2, 3], "source": "a"},
        {"input_ids": [4, 5], "labels": [4, 5], "source": "b"},
        {"input_ids": [6, 7, 8, 9], "labels": [-100, 7, 8, 9], "source": "c"},
    ]
    rows = pack_examples(examples, max_length=6)
    assert [r["sources"] for r in rows] == [["b", "c"], ["a"]]
    assert rows[0]["input_ids"] == [4, 5, 6, 7, 8, 9]
    assert rows[0]["position_ids"] == [0, 1, 0, 1, 2, 3]
    # An example's first token is never a target: unpacked nothing predicts it either.
    assert rows[0]["labels"] == [IGNORE_INDEX, 5, IGNORE_INDEX, 7, 8, 9]
    batch = collate_sft(rows, pad_token_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 3], [0, 1, 2, 0, 1, 2]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]


def test_a_row_longer_than_max_length_is_refused_before_the_model_loads(workdir, tmp_path):
    tokenizer_only = tmp_path / "tokenizer-only"
    tokenizer_only.mkdir()
    for item in (workdir / "model").iterdir():
        if item.suffix != ".safetensors":
            (tokenizer_only / item.name).write_bytes(item.read_bytes())
    long_rows = write_jsonl(tmp_path / "long.jsonl", [*sft_rows(3), {"prompt": "x" * 200, "response": "y"}])
    output_dir = tmp_path / "out"
    config, pm = configure(
        None, ["lora"], overrides(workdir, f"model={tokenizer_only}", f"data.train={long_rows}", f"output_dir={output_dir}")
    )
    with pytest.raises(DataError) as error:
        train(config, pm)
    message = " ".join(str(error.value).split())
    assert message.startswith(f"{long_rows}:4: ") and f"do not fit a packed row of train.max_length={MAX_LENGTH}" in message
    assert [p.name for p in output_dir.iterdir()] == [LOCK_FILE]


@pytest.mark.parametrize(("plugin", "reason"), [("prompt_tuning", "virtual tokens"), ("dpo", "pair")])
def test_methods_packing_cannot_serve_exactly_refuse_it(workdir, plugin, reason):
    plugins = [plugin] if plugin == "prompt_tuning" else ["lora", plugin]
    with pytest.raises(ConfigError) as error:
        configure(None, plugins, overrides(workdir))
    (problem,) = [p for p in error.value.problems if p.startswith("train.packing")]
    assert reason in problem and "set train.packing: false" in problem


def test_packed_training_runs_and_resumes_exactly(workdir, tmp_path):
    """Packing happens at load time (deterministic), so the loop's seeded order and resume hold."""
    from ftengine.testing import KillAfter

    base = overrides(workdir, "train.max_steps=4", "train.batch_size=2", "train.lr=1e-3", "train.save_every=2")
    config, pm = configure(None, ["lora"], [*base, f"output_dir={tmp_path / 'whole'}"])
    whole = train(config, pm)
    assert whole["data"]["train"]["packed_rows"] < whole["data"]["train"]["examples"] == 11
    config, pm = configure(None, ["lora"], [*base, f"output_dir={tmp_path / 'cut'}"])
    pm.register(KillAfter(2))
    with pytest.raises(KeyboardInterrupt):
        train(config, pm)
    config, pm = configure(None, ["lora"], [*base, f"output_dir={tmp_path / 'cut'}"])
    train(config, pm, resume=True)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "whole" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
