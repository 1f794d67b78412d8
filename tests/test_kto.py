"""KTO: unpaired data and its errors, the KL rows, parity of loss and gradients with TRL's
KTOTrainer, the KL estimate across processes, and a short LoRA run whose adapter PEFT loads."""

import json
import math
import random

import pytest
import torch
import torch.multiprocessing as mp
from ftengine import hookimpl
from ftengine.adapter_contract import AdapterContract
from ftengine.build import build, configure
from ftengine.data import IGNORE_INDEX
from ftengine.distributed import World
from ftengine.errors import ConfigError, DataError
from ftengine.loop import save, train
from ftengine.methods import adapter_methods
from ftengine.plugins import kto
from ftengine.state import RunState
from ftengine.testing import tiny_tokenizer, write_jsonl
from safetensors.torch import load_file

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
LORA = ["lora.r=4", "lora.dropout=0", "lora.target_modules=[q_proj,v_proj]"]


def unpaired_rows(n, seed=0):
    """Chat rows: the reversed word is desirable, the word itself undesirable (labels alternate)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        word = rng.choice(WORDS) * rng.randint(1, 2)
        desirable = i % 2 == 0
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"Reverse: {word}"}],
                "completion": [{"role": "assistant", "content": word[::-1] if desirable else word}],
                "label": desirable,
            }
        )
    return rows


def kto_overrides(model_dir, data, tmp_path, *extra):
    return [
        f"model={model_dir}",
        f"data.train={data}",
        f"data.eval={data}",
        f"output_dir={tmp_path / 'out'}",
        "train.batch_size=6",
        "train.log_every=1",
        *extra,
    ]


def records(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def load(tmp_path, rows, max_length=256):
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    return kto.load_unpaired_file(str(path), tiny_tokenizer(), max_length, "train")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "q", "completion": "a"}, r":1: missing field 'label' \(true for a desirable completion"),
        (
            {"prompt": "q", "completion": "a", "label": 1},
            r":1: field 'label' must be true \(desirable\) or false .*got 1 \(int\)",
        ),
        ({"prompt": "q", "completion": "a", "label": "yes"}, r":1: field 'label' must be true .*got 'yes' \(str\)"),
        ({"prompt": "q", "label": True}, ":1: missing field 'completion'"),
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, ":1: the kto plugin expects unpaired rows .* a preference pair"),
        ({"prompt": "q", "response": "a"}, ":1: the kto plugin expects unpaired rows .* looks like SFT data"),
    ],
)
def test_bad_rows_name_the_line_and_field(tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        load(tmp_path, [row])


@pytest.mark.parametrize("label, missing", [(True, "false \\(undesirable\\)"), (False, "true \\(desirable\\)")])
def test_one_label_class_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, label, missing):
    rows = [{"prompt": "q", "completion": "a", "label": label}] * 3
    data = write_jsonl(tmp_path / "one-class.jsonl", rows)
    config, pm = configure(None, ["lora", "kto"], kto_overrides(tiny_model_dir, data, tmp_path))
    pm.register(RefuseModelLoading(), "refuse-model-loading")
    with pytest.raises(DataError, match=f"one-class.jsonl: every row has label .*no row with label {missing}. KTO needs both"):
        train(config, pm)


class RefuseModelLoading:
    """Fails the run if the weights load: data errors must come first."""

    @hookimpl(tryfirst=True)
    def ftengine_load_model(self):
        raise AssertionError("the model loaded before the data was checked")


def test_kl_rows_pair_each_prompt_with_the_previous_rows_completion(tmp_path):
    examples, _ = load(tmp_path, unpaired_rows(3))
    batch = kto.collate_unpaired(examples, 256, 256, with_kl=True)
    assert batch["input_ids"].shape[0] == 6 and batch["label"].tolist() == [True, False, True]
    for i, example in enumerate(examples):
        other = examples[i - 1]  # the first row takes the last row's completion
        start, other_start = example["prompt_length"], other["prompt_length"]
        kl_ids = example["input_ids"][:start] + other["input_ids"][other_start:]
        assert batch["input_ids"][3 + i, : len(kl_ids)].tolist() == kl_ids
        assert (batch["labels"][3 + i] != IGNORE_INDEX).sum() == sum(label != IGNORE_INDEX for label in other["labels"])
    single = kto.collate_unpaired(examples[:1], 256, 256, with_kl=True)
    assert single["input_ids"].shape[0] == 1, "one row has no other completion to form a KL row"
    assert kto.collate_unpaired(examples, 256, 256, with_kl=False)["input_ids"].shape[0] == 3


# --------------------------------------------------------------------------------------------
# parity with TRL's KTOTrainer: loss, gradients and metrics on fixed batches
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parity_models(tiny_model_dir, tmp_path_factory):
    """An ftengine LoRA model with every adapter weight moved from its init, and TRL's
    KTOTrainer over the same adapter (saved by ftengine, loaded by PEFT): the policy differs from
    the reference (adapters off) in both."""
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from trl import KTOConfig, KTOTrainer

    root = tmp_path_factory.mktemp("kto-parity")
    rows = unpaired_rows(6, seed=1)
    data = write_jsonl(root / "rows.jsonl", rows)
    config, pm = configure(None, ["lora", "kto"], kto_overrides(tiny_model_dir, data, root, *LORA))
    model, tokenizer, info = build(config, pm)
    AdapterContract.perturb(model, info["trainable"])
    adapter = save(model, tokenizer, config, pm, root / "adapter")
    state = RunState(config=config, pm=pm, output_dir=root / "out", device=torch.device("cpu"))
    state.adapter_name = adapter_methods(pm).adapter_name(config)
    datasets = pm.hook.ftengine_load_dataset(config=config, tokenizer=tokenizer)
    pm.hook.ftengine_on_train_start(model=model, tokenizer=tokenizer, datasets=datasets, state=state)

    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter, is_trainable=True)
    args = KTOConfig(
        output_dir=str(root / "trl"),
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        max_length=None,
        per_device_train_batch_size=len(rows),
        seed=0,
    )
    trainer = KTOTrainer(model=policy, args=args, train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer())
    # Given an adapter, TRL copies it as its reference ("ref"); without the copy its reference
    # is the model with adapters off, as ours.
    trainer.model.delete_adapter("ref")
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    return model, state, datasets, trainer, trl_batch


def unpadded(ids, mask):
    return [row[: int(m.sum())].tolist() for row, m in zip(ids, mask)]


def test_rows_and_kl_rows_are_trls_tokens(parity_models):
    _, _, datasets, _, trl_batch = parity_models
    batch = datasets.collate(datasets.train)
    size = len(datasets.train)
    ours = unpadded(batch["input_ids"], batch["attention_mask"])
    assert ours[:size] == unpadded(trl_batch["input_ids"], trl_batch["attention_mask"])
    assert ours[size:] == unpadded(trl_batch["KL_input_ids"], trl_batch["KL_attention_mask"])
    completion = (batch["labels"][:size] != IGNORE_INDEX).long()
    assert torch.equal(completion[:, : trl_batch["completion_mask"].shape[1]], trl_batch["completion_mask"])
    assert torch.equal(batch["label"], trl_batch["label"])


def trl_inputs(batch, size):
    """Our batch as TRL's collator lays it out (the KL rows under ``KL_``)."""
    mask = (batch["labels"] != IGNORE_INDEX).long()
    inputs = {"input_ids": batch["input_ids"][:size], "attention_mask": batch["attention_mask"][:size]}
    inputs |= {"completion_mask": mask[:size], "label": batch["label"]}
    inputs |= {"KL_input_ids": batch["input_ids"][size:], "KL_attention_mask": batch["attention_mask"][size:]}
    return inputs | {"KL_completion_mask": mask[size:]}


def grads(model):
    named = {n.replace("base_model.model.", "", 1): p.grad for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return named


@pytest.mark.parametrize(
    "loss_type, beta, desirable_weight, undesirable_weight, rows",
    [
        ("kto", 0.1, 1.0, 1.0, "all"),
        ("kto", 2.0, 1.33, 0.5, "all"),
        ("apo_zero_unpaired", 0.5, 1.0, 1.2, "all"),
        ("kto", 0.5, 1.0, 1.0, "desirable"),  # a micro-batch of one label class: the loss stays defined
    ],
)
def test_loss_gradients_and_metrics_equal_trl(parity_models, loss_type, beta, desirable_weight, undesirable_weight, rows):
    model, state, datasets, trainer, _ = parity_models
    options = state.config.kto
    options.loss_type, options.beta = loss_type, beta
    options.desirable_weight, options.undesirable_weight = desirable_weight, undesirable_weight
    examples = [e for e in datasets.train if rows == "all" or e["label"]]
    batch = datasets.collate(examples)

    model.train()
    out = state.pm.hook.ftengine_compute_loss(model=model, batch=batch, state=state)
    (out.loss / out.count).backward()
    ours = grads(model)

    trainer.loss_type, trainer.beta, trainer.calculate_KL = loss_type, beta, loss_type == "kto"
    trainer.desirable_weight, trainer.undesirable_weight = desirable_weight, undesirable_weight
    trainer.model.train()
    trainer._metrics["train"].clear()
    trl_loss = trainer.compute_loss(trainer.model, trl_inputs(batch, len(examples)))
    trl_loss.backward()
    theirs = grads(trainer.model)
    trl = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    assert float(out.loss) / out.count == pytest.approx(float(trl_loss), rel=1e-5)
    assert ours.keys() == theirs.keys() and len(ours) == 8  # q_proj, v_proj: A and B, 2 layers
    for name, gradient in ours.items():
        # Elements far below the tensor's largest are float32 rounding apart (~3e-8): measured at its scale.
        scale = float(theirs[name].abs().max())
        torch.testing.assert_close(gradient, theirs[name], rtol=1e-5, atol=1e-5 * scale, msg=lambda m, name=name: f"{name}: {m}")
    metrics = out.metrics
    if rows == "all":  # (the desirable rows' mismatched log-ratios average below 0: clamped)
        assert trl["kl"] > 0.01 if loss_type == "kto" else trl["kl"] == 0, "the KL term must take part"
    assert metrics["kl"] / out.count == pytest.approx(trl["kl"], rel=1e-5, abs=1e-9)
    assert metrics["rewards_chosen_sum"] / metrics["count_chosen"] == pytest.approx(trl["rewards/chosen"], rel=1e-5)
    assert metrics["logps_chosen_sum"] / metrics["count_chosen"] == pytest.approx(trl["logps/chosen"], rel=1e-5)
    if rows == "all":
        assert metrics["rewards_rejected_sum"] / metrics["count_rejected"] == pytest.approx(trl["rewards/rejected"], rel=1e-5)
        assert metrics["logps_rejected_sum"] / metrics["count_rejected"] == pytest.approx(trl["logps/rejected"], rel=1e-5)
    else:
        assert metrics["count_rejected"] == 0 and "rewards/rejected" not in trl


# --------------------------------------------------------------------------------------------
# the KL estimate on several processes; configuration; a short run
# --------------------------------------------------------------------------------------------


def _kl_on_rank(rank, size, init_file, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        log_ratios = [torch.tensor([0.5, 1.5]), torch.tensor([-0.2, 0.6])][rank]  # means 1.0 and 0.2
        results[rank] = kto.kl_estimate(log_ratios, torch.zeros(2), World(rank=rank, size=size))
    finally:
        torch.distributed.destroy_process_group()


def test_kl_estimate_is_the_mean_over_every_process_clamped_at_zero(tmp_path):
    results = mp.get_context("fork").Manager().dict()
    mp.start_processes(_kl_on_rank, args=(2, tmp_path / "rendezvous", results), nprocs=2, start_method="fork")
    assert dict(results) == {0: pytest.approx(0.6), 1: pytest.approx(0.6)}  # as TRL's gathered mean of the ranks
    assert kto.kl_estimate(torch.tensor([-1.0, 0.5]), torch.zeros(2), World()) == 0.0
    assert kto.kl_estimate(torch.zeros(0), torch.zeros(0), World()) == 0.0, "no KL row: no estimate"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["train.batch_size=1"], "train.batch_size: kto estimates its KL term .* at least 2 rows"),
        (["kto.loss_type=dpo"], "kto.loss_type: Input should be 'kto' or 'apo_zero_unpaired'"),
        (["kto.desirable_weight=0"], "kto.desirable_weight: Input should be greater than 0"),
        (["train.packing=true"], "packing is not supported with kto"),
    ],
)
def test_config_errors_name_the_fix(tiny_model_dir, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        configure(None, ["lora", "kto"], kto_overrides(tiny_model_dir, tmp_path / "rows.jsonl", tmp_path, *extra))


def test_lora_kto_lowers_the_loss_and_peft_loads_the_adapter(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "rows.jsonl", unpaired_rows(12))
    overrides = kto_overrides(tiny_model_dir, data, tmp_path, *LORA, "train.max_steps=12", "train.lr=2e-2")
    summary = train(*configure(None, ["lora", "kto"], overrides), eval_before=True)
    before, after = summary["before"], summary["after"]
    assert before["eval_loss"] == pytest.approx(0.5, abs=1e-6)  # policy == reference: every loss is 1 - sigmoid(0)
    assert after["eval_loss"] < before["eval_loss"] - 0.05
    chosen = after["eval_rewards_chosen_sum"] / after["eval_count_chosen"]
    rejected = after["eval_rewards_rejected_sum"] / after["eval_count_rejected"]
    assert chosen > rejected, "desirable completions must gain on undesirable ones"
    first_step = next(r for r in records(tmp_path / "out") if "loss" in r)
    assert {"kl", "rewards_chosen_sum", "logps_rejected_sum", "count_chosen"} <= set(first_step)

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), summary["saved"]).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        assert not torch.allclose(peft_model(ids).logits, base(ids).logits, atol=1e-4), "the trained adapter must load"
    assert math.isfinite(after["eval_kl"])


def test_init_adapter_starts_training_and_is_the_reference(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", unpaired_rows(6))
    sft_config, sft_pm = configure(None, ["lora"], [f"model={tiny_model_dir}", f"data.train={data}", *LORA])
    sft_model, tokenizer, sft_info = build(sft_config, sft_pm)
    AdapterContract.perturb(sft_model, sft_info["trainable"])
    sft_dir = save(sft_model, tokenizer, sft_config, sft_pm, tmp_path / "sft")
    overrides = kto_overrides(tiny_model_dir, data, tmp_path, *LORA, "train.max_steps=1", f"kto.init_adapter={sft_dir}")
    summary = train(*configure(None, ["lora", "kto"], overrides))
    first_step = next(r for r in records(tmp_path / "out") if "loss" in r)
    assert first_step["loss"] == pytest.approx(0.5, abs=1e-6) and first_step["kl"] == 0  # reference == policy
    trained, sft = (load_file(path / "adapter_model.safetensors") for path in (summary["saved"], sft_dir))
    for name in sft:  # one small step from the SFT adapter (a fresh one has lora_B = 0)
        torch.testing.assert_close(trained[name], sft[name], rtol=0, atol=1e-2)
