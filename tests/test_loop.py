"""The training loop: gradient accumulation, determinism, resume, atomic checkpoints, full FT."""

import json
import math
from pathlib import Path

import pytest
import torch
from ftengine import checkpoint
from ftengine.build import configure
from ftengine.distributed import Parallel
from ftengine.loop import train
from ftengine.testing import KillAfter
from transformers import AutoModelForCausalLM


def losses(output_dir):
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def run(overrides, plugins=("full",), resume=False, eval_before=False):
    config, pm = configure(None, list(plugins), overrides)
    return train(config, pm, resume=resume, eval_before=eval_before)


def llama_parameter_count(config):
    """A Llama model's parameter count from its shapes: token embeddings and an untied head
    (vocab x h); per layer q and o (h x h), k and v (h x kv heads * head dim), gate, up and
    down (h x intermediate) and two norms (h); a final norm (h)."""
    h, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    layer = 2 * h * h + 2 * h * kv + 3 * h * config.intermediate_size + 2 * h
    return 2 * config.vocab_size * h + config.num_hidden_layers * layer + h


def test_full_finetuning_learns_and_saves_a_loadable_model(run_overrides, tiny_model_dir, tmp_path):
    summary = run(run_overrides + ["train.max_steps=8"], eval_before=True)
    history = losses(tmp_path / "out")
    assert history[-1][1] < history[0][1]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # Measured: 6.31 before (the random init is worse than a uniform guess), 4.93 after.
    uniform_guess = math.log(base.config.vocab_size)  # 5.56
    assert summary["after"]["eval_loss"] < min(uniform_guess, summary["before"]["eval_loss"] - 1.0)
    model = AutoModelForCausalLM.from_pretrained(summary["saved"])
    assert sum(p.numel() for p in model.parameters()) == llama_parameter_count(base.config) == 35168
    saved, original = model.state_dict(), base.state_dict()
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in original.items()}
    assert all(not torch.equal(saved[k], original[k]) for k in saved), "full fine-tuning trains every weight"


def test_metrics_jsonl_has_train_and_eval_records(run_overrides, tmp_path):
    run(run_overrides + ["train.eval_every=2", "train.log_every=1"])
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    eval_records = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(train_records[0])
    assert [r["step"] for r in eval_records] == [2, 4]


def test_gradient_accumulation_normalises_by_total_target_tokens(run_overrides, tmp_path):
    """4 micro-batches of 1 must equal 1 batch of 4: each target token weighs the same."""
    common = run_overrides + ["train.max_steps=1", "train.max_grad_norm=null", "train.lr=0.5"]
    one = run(
        common + ["train.batch_size=4", "train.grad_accum=1", f"output_dir={tmp_path / 'one'}"], ("full", "sample_plugins.sgd")
    )
    many = run(
        common + ["train.batch_size=1", "train.grad_accum=4", f"output_dir={tmp_path / 'many'}"], ("full", "sample_plugins.sgd")
    )
    assert losses(tmp_path / "one")[0][1] == pytest.approx(losses(tmp_path / "many")[0][1], rel=1e-6)
    a = AutoModelForCausalLM.from_pretrained(one["saved"]).state_dict()
    b = AutoModelForCausalLM.from_pretrained(many["saved"]).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=2e-6)


def test_same_seed_same_losses(run_overrides, tmp_path):
    run(run_overrides + [f"output_dir={tmp_path / 'a'}"])
    run(run_overrides + [f"output_dir={tmp_path / 'b'}"])
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_resume_reproduces_the_uninterrupted_run(run_overrides, tmp_path):
    overrides = run_overrides + ["train.max_steps=6", "train.save_every=3"]
    run(overrides + [f"output_dir={tmp_path / 'straight'}"])
    resumed_dir = tmp_path / "resumed"
    config, pm = configure(None, ["full"], overrides + [f"output_dir={resumed_dir}"])
    pm.register(KillAfter(4))
    with pytest.raises(KeyboardInterrupt):
        train(config, pm)
    assert [p.name for p in checkpoint.checkpoint_dirs(resumed_dir)] == ["step-000003"]
    run(overrides + [f"output_dir={resumed_dir}"], resume=True)
    assert losses(resumed_dir) == losses(tmp_path / "straight")


def test_resume_without_checkpoint_is_a_clear_error(run_overrides):
    from ftengine.errors import FtengineError

    with pytest.raises(FtengineError, match="no complete checkpoint found"):
        run(run_overrides, resume=True)


def test_killed_mid_save_leaves_previous_checkpoint_usable(run_overrides, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_save = torch.save
    calls = {"n": 0}

    def dies_on_second_checkpoint(obj, path, *args, **kwargs):
        if str(getattr(path, "name", path)).endswith("optimizer.pt"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt("killed mid-save")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", dies_on_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run(run_overrides + ["train.max_steps=4", "train.save_every=2"])
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert [p.name for p in checkpoint.checkpoint_dirs(out)] == ["step-000002"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not (out / "final").exists()
    run(run_overrides + ["train.max_steps=4", "train.save_every=2"], resume=True)
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4]


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = checkpoint.atomic_write_text(tmp_path / "f.txt", "old")

    def fails(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        checkpoint.atomic_write(target, fails)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_sft_loss_on_target_positions_only_equals_the_full_logits_loss(tiny_model_dir, tiny_data):
    """The loss computes the vocabulary head only where a target is predicted; same value."""
    from ftengine.data import IGNORE_INDEX, collate_sft, load_sft_file
    from ftengine.plugins import sft
    from ftengine.plugins.hf_loader import load_pretrained

    model, tokenizer = load_pretrained(str(tiny_model_dir))
    examples, _ = load_sft_file(tiny_data[0], tokenizer, 512)
    batch = collate_sft(examples[:4], tokenizer.pad_token_id)
    fast = sft.ftengine_compute_loss(model=model, batch=batch, state=None)
    # By hand from all logits: position t predicts token t+1, where it is a response token.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    targets = labels != IGNORE_INDEX
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    full_loss = -log_probs[targets].gather(1, labels[targets].unsqueeze(1)).sum()
    assert fast.count == int(targets.sum()) > 0
    torch.testing.assert_close(fast.loss, full_loss, rtol=1e-6, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_losses(run_overrides, tmp_path):
    run(run_overrides + [f"output_dir={tmp_path / 'plain'}"], plugins=("lora",))
    run(run_overrides + [f"output_dir={tmp_path / 'ckpt'}", "train.gradient_checkpointing=true"], plugins=("lora",))
    plain, checkpointed = losses(tmp_path / "plain"), losses(tmp_path / "ckpt")
    assert [s for s, _ in plain] == [s for s, _ in checkpointed]
    for (_, a), (_, b) in zip(plain, checkpointed):
        assert a == pytest.approx(b, rel=1e-5)


def test_bf16_precision_trains_under_autocast_on_a_cpu(run_overrides, tmp_path):
    """``train.precision: bf16`` computes the steps in bfloat16 on a CPU (the weights stay fp32):
    the losses follow the fp32 run's closely without equalling them (CPU fp32 runs repeat exactly)."""
    run(run_overrides + [f"output_dir={tmp_path / 'fp32'}"], plugins=("lora",))
    run(run_overrides + [f"output_dir={tmp_path / 'bf16'}", "train.precision=bf16"], plugins=("lora",))
    fp32, bf16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert [s for s, _ in fp32] == [s for s, _ in bf16]
    assert all(a != b for (_, a), (_, b) in zip(fp32, bf16))
    for (_, a), (_, b) in zip(fp32, bf16):
        assert b == pytest.approx(a, rel=2e-2)


def test_bf16_precision_keeps_frozen_linear_weights_in_bf16_with_the_same_results(run_overrides, tmp_path, monkeypatch):
    """Frozen ``nn.Linear`` weights are stored in bf16 (autocast cast them anew at every forward):
    the losses and the adapter equal those of casting at every forward; what is trained and the
    embedding its output head is tied to stay fp32."""
    from ftengine import loop
    from ftengine.testing import save_tiny_model
    from safetensors.torch import load_file

    tied = save_tiny_model(tmp_path / "tied", tie_word_embeddings=True)  # as SmolLM2's
    overrides = run_overrides + ["train.precision=bf16", f"model={tied}"]
    config, pm = configure(None, ["lora"], overrides + [f"output_dir={tmp_path / 'built'}"])
    model = loop.prepare(config, pm, tmp_path / "built", resume=False).model
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["model.layers.0.mlp.down_proj.base_layer.weight"] == torch.bfloat16
    assert dtypes["model.layers.0.mlp.down_proj.lora_A.default.weight"] == torch.float32
    assert dtypes["model.embed_tokens.weight"] == torch.float32 and model.lm_head.weight is model.model.embed_tokens.weight

    run(overrides + [f"output_dir={tmp_path / 'stored'}"], plugins=("lora",))
    monkeypatch.setattr(Parallel, "store_frozen_weights_in", lambda self, dtype: None)
    run(overrides + [f"output_dir={tmp_path / 'cast'}"], plugins=("lora",))
    assert losses(tmp_path / "stored") == losses(tmp_path / "cast")
    stored, cast = (load_file(tmp_path / d / "final" / "adapter_model.safetensors") for d in ("stored", "cast"))
    assert all(torch.equal(stored[name], cast[name]) for name in cast)


def test_truncation_is_reported_when_training_starts(run_overrides, tiny_data, capsys):
    from ftengine.data import IGNORE_INDEX, load_sft_file
    from ftengine.testing import tiny_tokenizer

    examples, _ = load_sft_file(tiny_data[0], tiny_tokenizer(), 10**6)  # nothing cut
    longer = [e for e in examples if len(e["input_ids"]) > 38]
    no_response_left = [e for e in longer if all(label == IGNORE_INDEX for label in e["labels"][:38])]
    assert (len(examples), len(longer), len(no_response_left)) == (16, 15, 0)
    run(run_overrides + ["train.max_length=38", "train.max_steps=1"])
    expected = "train: 15 of 16 rows longer than train.max_length=38 were truncated (0 dropped: no response token left)"
    assert expected in " ".join(capsys.readouterr().err.split())  # rich wraps long lines
