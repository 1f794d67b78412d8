"""DPO: preference data, the loss formulas, parity with TRL's DPOTrainer, the reference model
(adapters off, a reference adapter, a frozen copy, a cache) and short training runs."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
from ftengine import hookimpl
from ftengine.adapter_contract import AdapterContract
from ftengine.adapters import read_adapter_tensors
from ftengine.build import build, configure
from ftengine.data import IGNORE_INDEX
from ftengine.errors import ConfigError, DataError, FtengineError
from ftengine.loop import save, train
from ftengine.methods import adapter_methods
from ftengine.plugins import dpo
from ftengine.state import RunState
from ftengine.testing import KillAfter, LogitsOnly, sft_rows, tiny_model, tiny_tokenizer, write_jsonl
from safetensors.torch import load_file

EXAMPLES = Path(__file__).parent.parent / "examples" / "contacts"
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
LOG2 = math.log(2)


def preference_rows(n, seed=0):
    """Chat preference rows: the reversed word is preferred over the word itself."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = rng.choice(WORDS) * rng.randint(1, 2)
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"Reverse: {word}"}],
                "chosen": [{"role": "assistant", "content": word[::-1]}],
                "rejected": [{"role": "assistant", "content": word}],
            }
        )
    return rows


@pytest.fixture
def prefs(tmp_path):
    return write_jsonl(tmp_path / "prefs.jsonl", preference_rows(8))


def dpo_overrides(model_dir, prefs, tmp_path, *extra):
    return [
        f"model={model_dir}",
        f"data.train={prefs}",
        f"data.eval={prefs}",
        f"output_dir={tmp_path / 'out'}",
        "train.batch_size=8",
        "train.log_every=1",
        *extra,
    ]


def records(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def start(config, pm, model, tokenizer, tmp_path):
    """The state a run has when its first loss is computed (``ftengine_on_train_start`` done)."""
    adapter_name = adapter_methods(pm).adapter_name(config)
    state = RunState(config=config, pm=pm, output_dir=tmp_path / "out", device=torch.device("cpu"), adapter_name=adapter_name)
    state.output_dir.mkdir(parents=True, exist_ok=True)
    datasets = pm.hook.ftengine_load_dataset(config=config, tokenizer=tokenizer)
    pm.hook.ftengine_on_train_start(model=model, tokenizer=tokenizer, datasets=datasets, state=state)
    return state


# --------------------------------------------------------------------------------------------
# the loss formulas, on fixed log-probs
# --------------------------------------------------------------------------------------------

CHOSEN_RATIOS = torch.tensor([1.5, -0.4, 0.2])  # policy - reference log-probs of chosen
REJECTED_RATIOS = torch.tensor([-2.0, 0.3, 0.2])
CHOSEN_TOKENS = torch.tensor([3, 5, 4])
REJECTED_TOKENS = torch.tensor([6, 2, 4])


def by_hand(loss_type, beta, smoothing, c, r, nc, nr):
    def log_sigmoid(x):
        return -math.log1p(math.exp(-x))

    z = beta * (c - r)
    if loss_type == "sigmoid":
        return -(1 - smoothing) * log_sigmoid(z) - smoothing * log_sigmoid(-z)
    if loss_type == "robust":
        return (-(1 - smoothing) * log_sigmoid(z) + smoothing * log_sigmoid(-z)) / (1 - 2 * smoothing)
    if loss_type == "hinge":
        return max(0.0, 1 - z)
    return (c / nc - r / nr - 1 / (2 * beta)) ** 2


@pytest.mark.parametrize(
    "loss_type, beta, smoothing",
    [
        ("sigmoid", 0.1, 0.0),
        ("sigmoid", 0.5, 0.2),
        ("robust", 0.1, 0.1),
        ("hinge", 0.7, 0.0),
        ("ipo", 0.1, 0.0),
        ("ipo", 2.0, 0.0),
    ],
)
def test_pair_losses_match_the_formulas(loss_type, beta, smoothing):
    options = dpo.DpoOptions(loss_type=loss_type, beta=beta, label_smoothing=smoothing)
    losses = dpo.pair_losses(options, CHOSEN_RATIOS, REJECTED_RATIOS, CHOSEN_TOKENS, REJECTED_TOKENS)
    values = zip(CHOSEN_RATIOS.tolist(), REJECTED_RATIOS.tolist(), CHOSEN_TOKENS.tolist(), REJECTED_TOKENS.tolist())
    expected = [by_hand(loss_type, beta, smoothing, *v) for v in values]
    torch.testing.assert_close(losses, torch.tensor(expected), rtol=1e-6, atol=1e-7)


def test_sigmoid_without_smoothing_is_the_dpo_loss():
    options = dpo.DpoOptions()
    losses = dpo.pair_losses(options, CHOSEN_RATIOS, REJECTED_RATIOS, CHOSEN_TOKENS, REJECTED_TOKENS)
    torch.testing.assert_close(losses, -torch.nn.functional.logsigmoid(0.1 * (CHOSEN_RATIOS - REJECTED_RATIOS)))


def test_metrics_are_sums_over_pairs():
    policy = (torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]))
    reference = (torch.tensor([-1.5, -2.0]), torch.tensor([-2.0, -2.0]))
    metrics = dpo.pair_metrics(dpo.DpoOptions(beta=0.5), policy, reference)
    assert metrics["rewards_chosen"] == pytest.approx(0.25)  # 0.5 * (0.5 + 0)
    assert metrics["rewards_rejected"] == pytest.approx(0.0)  # 0.5 * (-1 + 1)
    assert metrics["reward_margin"] == pytest.approx(0.25)
    assert metrics["reward_accuracy"] == 1.0  # pair 0: 0.25 > -0.5; pair 1: 0 > 0.5 is false


def test_logps_are_the_same_with_and_without_logits_to_keep(tmp_path):
    model = tiny_model()
    examples, _ = load(tmp_path, preference_rows(4))
    batch = dpo.collate_pairs(examples, 256)
    with torch.no_grad():
        kept, full = dpo.sequence_logps(model, batch), dpo.sequence_logps(LogitsOnly(model), batch)
    for a, b in zip(kept, full):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)  # float32 sums of ~70


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def load(tmp_path, rows, max_length=512):
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    return dpo.load_preference_file(path, tiny_tokenizer(), max_length, "train")


def test_string_rows_are_rendered_as_chats(tmp_path):
    chat, _ = load(tmp_path, preference_rows(2))
    strings, _ = load(
        tmp_path,
        [
            {"prompt": r["prompt"][0]["content"], "chosen": r["chosen"][0]["content"], "rejected": r["rejected"][0]["content"]}
            for r in preference_rows(2)
        ],
    )
    for a, b in zip(chat, strings):
        assert (a["chosen_ids"], a["chosen_labels"], a["rejected_labels"]) == (
            b["chosen_ids"],
            b["chosen_labels"],
            b["rejected_labels"],
        )


def test_only_the_response_turns_are_labelled(tmp_path):
    tokenizer = tiny_tokenizer()
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "reverse abc"},
        ],
        "chosen": [{"role": "assistant", "content": "cba"}],
        "rejected": [{"role": "assistant", "content": "abc!"}],
    }
    (example,), _ = load(tmp_path, [row])
    for side, text in (("chosen", "cba"), ("rejected", "abc!")):
        labelled = [t for t in example[f"{side}_labels"] if t != IGNORE_INDEX]
        assert tokenizer.decode(labelled) == f"{text}<|im_end|>\n"  # the earlier assistant turn is prompt


def test_collate_puts_chosen_rows_then_rejected_rows(tmp_path):
    examples, _ = load(tmp_path, preference_rows(3))
    batch = dpo.collate_pairs(examples, 256)
    assert batch["input_ids"].shape[0] == 6 and batch["labels"].shape == batch["input_ids"].shape
    for i, example in enumerate(examples):
        assert batch["input_ids"][i, : len(example["chosen_ids"])].tolist() == example["chosen_ids"]
        assert batch["input_ids"][3 + i, : len(example["rejected_ids"])].tolist() == example["rejected_ids"]
    assert batch["index"].tolist() == [0, 1, 2] and batch["split"] == "train"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "q", "chosen": "a"}, ":1: missing field 'rejected'"),
        ({"prompt": "q", "chosen": "a", "rejected": 3}, ":1: field 'rejected' must be a string"),
        (
            {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": []},
            ":1: field 'chosen' must be a non-empty list",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "q"}],
                "chosen": [{"role": "user", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            ":1: 'chosen' has no assistant turn",
        ),
        ({"chosen": "a", "rejected": "b"}, ":1: missing field 'prompt'"),
    ],
)
def test_bad_rows_name_the_line_and_field(tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        load(tmp_path, [row])


def test_pairs_whose_response_is_cut_off_are_dropped_and_counted(tmp_path):
    rows = [{"prompt": "x" * 40, "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "bb"}]
    examples, stats = load(tmp_path, rows, max_length=30)
    assert stats == {"rows": 2, "truncated": 1, "dropped": 1}
    assert [e["source"].rsplit(":", 1)[1] for e in examples] == ["2"] and examples[0]["index"] == 0


def test_examples_keep_a_chat_row_ending_with_the_chosen_answer(tmp_path):
    (example,), _ = load(tmp_path, preference_rows(1))
    messages = example["row"]["messages"]
    assert messages[0]["role"] == "user" and messages[-1] == preference_rows(1)[0]["chosen"][0]


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "plugins, extra, message",
    [
        (["dpo"], [], "no active plugin trains anything"),
        (["lora", "dpo"], ["dpo.beta=0"], "dpo.beta: Input should be greater than 0"),
        (["lora", "dpo"], ["dpo.loss_type=kto"], "dpo.loss_type: Input should be 'sigmoid', 'ipo', 'hinge' or 'robust'"),
        (["lora", "dpo"], ["dpo.loss_type=hinge", "dpo.label_smoothing=0.1"], "has no label smoothing"),
        (["lora", "dpo"], ["dpo.init_adapter=/nonexistent"], "holds no adapter_config.json"),
    ],
)
def test_config_errors_name_the_fix(tiny_model_dir, prefs, tmp_path, plugins, extra, message):
    with pytest.raises(ConfigError, match=message):
        configure(None, plugins, dpo_overrides(tiny_model_dir, prefs, tmp_path, *extra))


def test_an_init_adapter_under_a_method_without_adapters_is_refused(tiny_model_dir, prefs, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    config, pm = configure(None, ["full", "dpo"], dpo_overrides(tiny_model_dir, prefs, tmp_path, f"dpo.init_adapter={adapter}"))
    with pytest.raises(FtengineError, match="this method trains no adapter to start from"):
        train(config, pm)


def test_example_config_is_valid():
    config, _ = configure(EXAMPLES / "dpo_lora.yaml", [], ["dpo.init_adapter=null"])
    assert config.data.train.endswith("prefs_train.jsonl") and config.dpo.loss_type == "sigmoid"


# --------------------------------------------------------------------------------------------
# parity with TRL's DPOTrainer
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_trainer(tiny_model_dir, tmp_path_factory):
    """TRL's DPOTrainer training a fresh PEFT prompt (random init): its reference is the model
    with the adapter disabled, its policy differs from it at step 0."""
    from datasets import Dataset
    from peft import PromptTuningConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    root = tmp_path_factory.mktemp("trl")
    rows = preference_rows(6, seed=1)
    args = DPOConfig(
        output_dir=str(root / "out"), report_to=[], use_cpu=True, max_length=None, precompute_ref_log_probs=False, seed=0
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tiny_tokenizer(),
        peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    )
    trainer.model.eval()
    trainer.model.save_pretrained(root / "prompt")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    return trainer, batch, write_jsonl(root / "prefs.jsonl", rows), root / "prompt"


@pytest.mark.parametrize(
    "loss_type, beta, smoothing", [("sigmoid", 0.1, 0.0), ("ipo", 0.1, 0.0), ("hinge", 0.5, 0.0), ("robust", 0.1, 0.1)]
)
def test_loss_and_rewards_equal_trl_at_step_0(trl_trainer, tiny_model_dir, tmp_path, loss_type, beta, smoothing):
    trainer, trl_batch, prefs, prompt = trl_trainer
    trainer.loss_types, trainer.beta, trainer.label_smoothing = [loss_type], beta, smoothing
    trainer._metrics["eval"].clear()
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, trl_batch))
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

    overrides = dpo_overrides(
        tiny_model_dir,
        prefs,
        tmp_path,
        "prompt_tuning.num_virtual_tokens=4",
        f"dpo.loss_type={loss_type}",
        f"dpo.beta={beta}",
        f"dpo.label_smoothing={smoothing}",
    )
    config, pm = configure(None, ["prompt_tuning", "dpo"], overrides)
    model, tokenizer, _ = build(config, pm)
    with torch.no_grad():  # the trained prompt starts from TRL's values (a new name would be another adapter)
        model.prompt_embeddings["default"].copy_(read_adapter_tensors(prompt)["prompt_embeddings"])
    datasets = pm.hook.ftengine_load_dataset(config=config, tokenizer=tokenizer)
    batch = datasets.collate(datasets.train)
    # The same token sequences and response masks as TRL's tokenisation and collator.
    assert torch.equal(batch["input_ids"], trl_batch["input_ids"])
    assert torch.equal((batch["labels"] != IGNORE_INDEX).long(), trl_batch["completion_mask"])

    state = start(config, pm, model, tokenizer, tmp_path)
    model.eval()
    with torch.no_grad():
        out = pm.hook.ftengine_compute_loss(model=model, batch=batch, state=state)
    metrics = {k: v / out.count for k, v in out.metrics.items()}
    assert abs(trl_metrics["rewards/margins"]) > 0.01, "the policy must differ from the reference"
    assert float(out.loss) / out.count == pytest.approx(trl_loss, abs=1e-4)
    for ours, theirs in (
        ("rewards_chosen", "rewards/chosen"),
        ("rewards_rejected", "rewards/rejected"),
        ("reward_margin", "rewards/margins"),
        ("reward_accuracy", "rewards/accuracies"),
        ("logps_chosen", "logps/chosen"),
        ("logps_rejected", "logps/rejected"),
    ):
        assert metrics[ours] == pytest.approx(trl_metrics[theirs], abs=1e-4), ours


# --------------------------------------------------------------------------------------------
# the reference model
# --------------------------------------------------------------------------------------------


def test_reference_is_the_model_with_adapters_off(tiny_model_dir, prefs, tmp_path):
    config, pm = configure(None, ["lora", "dpo"], dpo_overrides(tiny_model_dir, prefs, tmp_path, "lora.r=4"))
    model, tokenizer, info = build(config, pm)
    AdapterContract.perturb(model, info["trainable"])
    datasets = pm.hook.ftengine_load_dataset(config=config, tokenizer=tokenizer)
    batch = datasets.collate(datasets.train)
    state = start(config, pm, model, tokenizer, tmp_path)
    reference = state.plugin_data["dpo"].logps(model.train(), batch)
    from transformers import AutoModelForCausalLM

    base = dpo.sequence_logps(AutoModelForCausalLM.from_pretrained(tiny_model_dir), batch)
    for ours, expected in zip(reference, base):
        torch.testing.assert_close(ours, expected.detach())
    assert model.training, "the reference pass must leave the training mode as it was"
    policy = dpo.sequence_logps(model, batch)
    assert (policy[0] - reference[0]).abs().max() > 1e-3, "the adapter must be active again"


def test_lora_dpo_raises_preference_accuracy_and_margin(tiny_model_dir, prefs, tmp_path):
    overrides = dpo_overrides(tiny_model_dir, prefs, tmp_path, "lora.r=4", "train.max_steps=20", "train.lr=1e-2")
    config, pm = configure(None, ["lora", "dpo"], overrides)
    summary = train(config, pm, eval_before=True)
    before, after = summary["before"], summary["after"]
    assert before["eval_loss"] == pytest.approx(LOG2, abs=1e-6)  # policy == reference at init
    assert after["eval_reward_accuracy"] > before["eval_reward_accuracy"]
    assert after["eval_reward_margin"] > before["eval_reward_margin"] + 1.0
    assert after["eval_loss"] < before["eval_loss"]
    first_step = next(r for r in records(tmp_path / "out") if "loss" in r)
    assert {"rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"} <= set(first_step)


@pytest.mark.parametrize("precompute", [False, True])
def test_full_uses_a_frozen_copy(tiny_model_dir, prefs, tmp_path, precompute):
    overrides = dpo_overrides(
        tiny_model_dir, prefs, tmp_path, "train.max_steps=3", "train.lr=1e-3", f"dpo.precompute_ref={precompute}"
    )
    summary = train(*configure(None, ["full", "dpo"], overrides))
    assert records(tmp_path / "out")[0]["loss"] == pytest.approx(LOG2, abs=1e-6)
    assert summary["after"]["eval_reward_margin"] > 0.01  # the reference stayed where it started
    assert (tmp_path / "out" / dpo.REF_LOGPS_FILE).is_file() == precompute


def test_full_resumed_reloads_the_original_model_as_reference(tiny_model_dir, prefs, tmp_path):
    common = ["train.max_steps=4", "train.lr=1e-3", "train.batch_size=4", "train.save_every=2"]
    train(*configure(None, ["full", "dpo"], dpo_overrides(tiny_model_dir, prefs, tmp_path / "straight", *common)))
    config, pm = configure(None, ["full", "dpo"], dpo_overrides(tiny_model_dir, prefs, tmp_path / "resumed", *common))
    pm.register(KillAfter(2))
    with pytest.raises(KeyboardInterrupt):
        train(config, pm)
    train(*configure(None, ["full", "dpo"], dpo_overrides(tiny_model_dir, prefs, tmp_path / "resumed", *common)), resume=True)
    straight = [r["loss"] for r in records(tmp_path / "straight" / "out") if "loss" in r]
    resumed = [r["loss"] for r in records(tmp_path / "resumed" / "out") if "loss" in r]
    assert resumed == pytest.approx(straight, abs=1e-6)


def test_precomputed_reference_gives_the_same_losses_and_is_reused_on_resume(tiny_model_dir, prefs, tmp_path, monkeypatch):
    common = ["lora.r=4", "lora.dropout=0", "train.max_steps=4", "train.lr=1e-2", "train.batch_size=4", "train.save_every=2"]
    live = dpo_overrides(tiny_model_dir, prefs, tmp_path / "live", *common)
    train(*configure(None, ["lora", "dpo"], live))
    cached = dpo_overrides(tiny_model_dir, prefs, tmp_path / "cached", *common, "dpo.precompute_ref=true")
    train(*configure(None, ["lora", "dpo"], cached))
    live_losses = [r["loss"] for r in records(tmp_path / "live" / "out") if "loss" in r]
    cached_losses = [r["loss"] for r in records(tmp_path / "cached" / "out") if "loss" in r]
    assert cached_losses == pytest.approx(live_losses, abs=1e-5)

    ref_file = tmp_path / "cached" / "out" / dpo.REF_LOGPS_FILE
    assert load_file(ref_file)["train"].shape == (8, 2)

    def must_not_recompute(*args):
        raise AssertionError("the cached reference log-probs must be reused on resume")

    monkeypatch.setattr(dpo, "precompute_ref_logps", must_not_recompute)
    train(*configure(None, ["lora", "dpo"], cached + ["train.max_steps=6"]), resume=True)
    resumed = [r["step"] for r in records(tmp_path / "cached" / "out") if "loss" in r]
    assert resumed == [1, 2, 3, 4, 5, 6]


class CaptureStart:
    """Records the model and state right after every other plugin's train-start hook."""

    @hookimpl(trylast=True)
    def ftengine_on_train_start(self, model, state):
        self.model, self.state = model, state


def test_init_adapter_starts_training_and_is_the_reference(tiny_model_dir, prefs, tmp_path):
    sft_data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(8))
    sft_config, sft_pm = configure(None, ["lora"], [f"model={tiny_model_dir}", f"data.train={sft_data}", "lora.r=4"])
    sft_model, tokenizer, sft_info = build(sft_config, sft_pm)
    AdapterContract.perturb(sft_model, sft_info["trainable"])
    sft_dir = save(sft_model, tokenizer, sft_config, sft_pm, tmp_path / "sft")
    sft_params = {n: p.detach().clone() for n, p in sft_model.named_parameters() if p.requires_grad}

    overrides = dpo_overrides(
        tiny_model_dir,
        prefs,
        tmp_path,
        "lora.r=4",
        "lora.dropout=0",
        "train.max_steps=3",
        "train.lr=1e-2",
        f"dpo.init_adapter={sft_dir}",
    )
    config, pm = configure(None, ["lora", "dpo"], overrides)
    capture = CaptureStart()
    pm.register(capture)
    summary = train(config, pm)

    parameters = dict(capture.model.named_parameters())
    for name in sft_params:  # the reference adapter holds the SFT values, frozen
        reference = parameters[name.replace(".default.", f".{dpo.REFERENCE_ADAPTER}.")]
        assert torch.equal(reference, sft_params[name]) and not reference.requires_grad
    assert records(tmp_path / "out")[0]["loss"] == pytest.approx(LOG2, abs=1e-6)  # started from the SFT adapter
    trained, sft = (load_file(path / "adapter_model.safetensors") for path in (summary["saved"], sft_dir))
    assert trained.keys() == sft.keys() and all(not torch.equal(trained[k], sft[k]) for k in sft), "every tensor trained on"


def test_init_adapter_of_another_rank_is_refused(tiny_model_dir, prefs, tmp_path):
    sft_config, sft_pm = configure(None, ["lora"], [f"model={tiny_model_dir}", f"data.train={prefs}", "lora.r=8"])
    sft_model, tokenizer, _ = build(sft_config, sft_pm)
    sft_dir = save(sft_model, tokenizer, sft_config, sft_pm, tmp_path / "sft")
    overrides = dpo_overrides(tiny_model_dir, prefs, tmp_path, "lora.r=4", "train.max_steps=1", f"dpo.init_adapter={sft_dir}")
    with pytest.raises(FtengineError, match="does not have the shape of the one this run trains"):
        train(*configure(None, ["lora", "dpo"], overrides))
