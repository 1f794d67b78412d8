"""The shared model helpers of ``ftengine.modeling``, on the tiny model."""

from types import SimpleNamespace

import pytest
import torch
from ftengine.data import IGNORE_INDEX
from ftengine.modeling import autocast, eval_mode, generate_greedy, output_head, replace_module, target_logits
from ftengine.testing import LogitsOnly, greedy_without_cache, tiny_model, tiny_tokenizer
from torch import nn


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(), tiny_tokenizer()


def test_target_logits_compute_only_the_predicting_positions_and_agree_with_all_logits(tiny):
    model, _ = tiny
    ids = torch.arange(10, 30).view(2, 10)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 4:6], labels[1, 7] = ids[0, 4:6], ids[1, 7]  # predicted from positions 3, 4 and 6
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        kept, kept_targets = target_logits(model, batch)
        full, full_targets = target_logits(LogitsOnly(model), batch)
    assert kept.shape == (2, 3, 259) and full.shape == (2, 9, 259)
    assert torch.equal(kept_targets, full_targets[:, [3, 4, 6]])
    torch.testing.assert_close(kept, full[:, [3, 4, 6]], rtol=0, atol=1e-5)


def test_only_targets_projects_each_rows_labelled_positions_alone(tiny):
    model, _ = tiny
    ids = torch.arange(10, 30).view(2, 10)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 4:6], labels[1, 7] = ids[0, 4:6], ids[1, 7]  # predicted from positions 3, 4 (row 0) and 6 (row 1)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    projected = []
    with torch.no_grad():
        full, _ = target_logits(LogitsOnly(model), batch)
    handle = output_head(model).register_forward_hook(lambda module, args, output: projected.append(output.shape[:-1]))
    try:
        with torch.no_grad():
            logits, targets = target_logits(model, batch, only_targets=True)
    finally:
        handle.remove()
    assert projected == [(1, 3)], "3 labelled positions, not the 2 x 3 labelled in some row"
    assert torch.equal(targets, torch.stack([ids[0, 4], ids[0, 5], ids[1, 7]]).unsqueeze(0))
    torch.testing.assert_close(logits[0], torch.stack([full[0, 3], full[0, 4], full[1, 6]]), rtol=0, atol=1e-5)
    with torch.no_grad():  # a model without logits_to_keep: the same, from all logits
        fallback, fallback_targets = target_logits(LogitsOnly(model), batch, only_targets=True)
    assert torch.equal(fallback_targets, targets)
    torch.testing.assert_close(fallback, logits, rtol=0, atol=1e-5)


def test_eval_mode_restores_the_mode_even_after_an_error():
    model = nn.Sequential(nn.Dropout(0.5)).train()
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not model.training and not model[0].training
        raise RuntimeError
    assert model.training and model[0].training
    with eval_mode(model.eval()):
        pass
    assert not model.training


def test_autocast_follows_the_run_state():
    cpu = torch.device("cpu")
    with autocast(SimpleNamespace(device=cpu, autocast_dtype=None)):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(SimpleNamespace(device=cpu, autocast_dtype=torch.bfloat16)):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_greedy_generation_left_pads_and_equals_decoding_without_a_cache(tiny):
    model, tokenizer = tiny
    texts = ["Reverse: alpha", "Hi", "a longer prompt than the others"]
    model.train()
    completions = generate_greedy(model, tokenizer, texts, max_new_tokens=5)
    assert model.training and tokenizer.padding_side == "right", "mode and padding side are put back"
    for text, completion in zip(texts, completions):
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        expected = greedy_without_cache(model.eval(), ids, 5)[0, ids.shape[1] :]
        assert completion == tokenizer.decode(expected, skip_special_tokens=True)
    model.eval()
    assert any(completions), "a model that generates nothing would pass the comparison"


def test_greedy_generation_stops_at_a_stop_string(tiny):
    model, tokenizer = tiny
    (full,) = generate_greedy(model, tokenizer, ["Hi"], max_new_tokens=8)
    stop = next(ch for ch in full[:-1] if ch.isascii() and ch.isprintable())  # the random model's bytes vary
    (stopped,) = generate_greedy(model, tokenizer, ["Hi"], max_new_tokens=8, stop_strings=[stop])
    assert stopped == full[: full.index(stop) + 1]


def test_replace_module_and_output_head():
    model = tiny_model()
    assert output_head(model) is model.lm_head and output_head(nn.Linear(2, 2)) is None
    new = nn.Linear(32, 32)
    old = replace_module(model, "model.layers.1.self_attn.q_proj", new)
    assert isinstance(old, nn.Linear) and old is not new
    assert model.model.layers[1].self_attn.q_proj is new
    head = replace_module(model, "lm_head", nn.Identity())
    assert isinstance(model.lm_head, nn.Identity) and head.out_features == 259
