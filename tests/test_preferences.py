"""ORPO and SimPO: loss, gradients and metrics equal TRL's (ORPOTrainer, CPOTrainer with
loss_type="simpo") on fixed batches; one forward pass and no reference model; short LoRA runs
whose adapter loads in PEFT; bad rows stop the run before the model loads; composition with
full and qlora."""

import json
import math

import pytest
import torch
from ftengine.adapter_contract import AdapterContract
from ftengine.build import build, configure
from ftengine.errors import ConfigError, DataError
from ftengine.inference import load_for_inference
from ftengine.loop import train
from ftengine.plugins import orpo, simpo
from ftengine.state import RunState
from ftengine.testing import save_tiny_model, tiny_tokenizer, write_jsonl
from test_dpo import preference_rows

RTOL = 1e-5


def overrides(model_dir, prefs, out, *extra):
    return [
        f"model={model_dir}",
        f"data.train={prefs}",
        f"data.eval={prefs}",
        f"output_dir={out}",
        "train.batch_size=6",
        "train.log_every=1",
        *extra,
    ]


LORA = ("lora.r=4", "lora.dropout=0")


def records(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    """Chat pairs whose prompts and answers differ in length, so padding and averages matter."""
    rows = preference_rows(6, seed=3)
    rows[0]["prompt"].insert(0, {"role": "system", "content": "Answer with the word reversed."})
    return write_jsonl(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", rows)


# --------------------------------------------------------------------------------------------
# parity with TRL: loss, gradients, metrics
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy(tiny_model_dir, prefs, tmp_path_factory):
    """``policy(plugin, *opts) -> (model, batch, state)``: a LoRA model with a perturbed adapter
    (so the policy is not the base) and one batch of all the pairs, built once per module."""
    root = tmp_path_factory.mktemp("policy")
    built = {}

    def make(plugin, *opts):
        config, pm = configure(None, ["lora", plugin], overrides(tiny_model_dir, prefs, root / "out", *LORA, *opts))
        if plugin not in built:
            model, tokenizer, info = build(config, pm)
            AdapterContract.perturb(model, info["trainable"])
            datasets = pm.hook.ftengine_load_dataset(config=config, tokenizer=tokenizer)
            built[plugin] = model.eval(), datasets.collate(datasets.train)
        model, batch = built[plugin]
        state = RunState(config=config, pm=pm, output_dir=root / "out", device=torch.device("cpu"), adapter_name="default")
        return model, batch, state

    return make


def trl_batch(batch):
    """The pair batch in the layout of TRL's legacy preference collator."""
    half = len(batch["input_ids"]) // 2
    return {
        f"{side}_{key}": batch[key][rows]
        for side, rows in (("chosen", slice(None, half)), ("rejected", slice(half, None)))
        for key in ("input_ids", "attention_mask", "labels")
    }


def trainer(kind, model_dir, root, **args):
    """A real TRL trainer of ``kind`` (``orpo`` or ``cpo``), for its loss methods."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    if kind == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    else:
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer
    config = Config(output_dir=str(root / kind), report_to=[], use_cpu=True, **args)
    return Trainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=config,
        train_dataset=Dataset.from_list(preference_rows(2)),
        processing_class=tiny_tokenizer(),
    )


class CountForwards:
    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self.count)

    def count(self, module, args):
        self.calls += 1


def ours_and_trls(plugin, model, batch, state, trl_loss_and_metrics):
    """``(loss, gradients, metrics)`` of the plugin's loss and of TRL's on the same model and batch."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    forwards = CountForwards(model)
    out = plugin.ftengine_compute_loss(model=model, batch=batch, state=state)
    forwards.handle.remove()
    assert forwards.calls == 1, "one forward pass over [chosen; rejected], and no reference model"
    (out.loss / out.count).backward()
    ours = (float(out.loss.detach()) / out.count, {n: p.grad.clone() for n, p in params.items()})
    metrics = {k: v / out.count for k, v in out.metrics.items()}

    model.zero_grad()
    loss, trl_metrics = trl_loss_and_metrics(model, trl_batch(batch))
    loss.backward()
    theirs = (float(loss), {n: p.grad.clone() for n, p in params.items()})
    model.zero_grad()
    assert ours[0] == pytest.approx(theirs[0], rel=RTOL)
    for name in params:
        # Elements near 0 are float32 rounding of sums of larger terms: their tolerance is the tensor's scale.
        scale = float(theirs[1][name].abs().max())
        torch.testing.assert_close(ours[1][name], theirs[1][name], rtol=RTOL, atol=RTOL * scale, msg=name)
    return metrics, trl_metrics


SHARED_METRICS = (
    ("rewards_chosen", "rewards/chosen"),
    ("rewards_rejected", "rewards/rejected"),
    ("reward_margin", "rewards/margins"),
    ("reward_accuracy", "rewards/accuracies"),
    ("logps_chosen", "logps/chosen"),
    ("logps_rejected", "logps/rejected"),
    ("nll_loss", "nll_loss"),
)


def test_orpo_loss_gradients_and_metrics_equal_trl(policy, tiny_model_dir, tmp_path):
    model, batch, state = policy("orpo", "orpo.beta=0.25")
    orpo_trainer = trainer("orpo", tiny_model_dir, tmp_path, beta=0.25)
    metrics, theirs = ours_and_trls(orpo, model, batch, state, orpo_trainer.get_batch_loss_metrics)
    assert abs(theirs["log_odds_chosen"]) > 0.01, "the pairs must not be scored alike"
    for ours_key, trl_key in (*SHARED_METRICS, ("log_odds_ratio", "log_odds_ratio"), ("log_odds_chosen", "log_odds_chosen")):
        assert metrics[ours_key] == pytest.approx(theirs[trl_key], rel=RTOL, abs=1e-6), ours_key


@pytest.mark.parametrize(
    "beta, gamma, alpha, smoothing",
    [(0.1, 0.5, 0.0, 0.0), (2.0, 1.2, 1.0, 0.1)],  # SimPO as simpo's defaults (and TRL's docs) set it; CPO-SimPO with smoothing
)
def test_simpo_loss_gradients_and_metrics_equal_trl(policy, tiny_model_dir, tmp_path, beta, gamma, alpha, smoothing):
    opts = [f"simpo.beta={beta}", f"simpo.simpo_gamma={gamma}", f"simpo.cpo_alpha={alpha}", f"simpo.label_smoothing={smoothing}"]
    model, batch, state = policy("simpo", *opts)
    cpo = trainer(
        "cpo",
        tiny_model_dir,
        tmp_path,
        loss_type="simpo",
        beta=beta,
        simpo_gamma=gamma,
        cpo_alpha=alpha,
        label_smoothing=smoothing,
    )
    metrics, theirs = ours_and_trls(simpo, model, batch, state, cpo.get_batch_loss_metrics)
    assert abs(theirs["rewards/margins"]) > 0.01, "the pairs must not be scored alike"
    # TRL logs no NLL when cpo_alpha is 0 (it does not compute it); simpo always does.
    for ours_key, trl_key in SHARED_METRICS if alpha else SHARED_METRICS[:-1]:
        assert metrics[ours_key] == pytest.approx(theirs[trl_key], rel=RTOL, abs=1e-6), ours_key


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plugin", ["orpo", "simpo"])
def test_lora_training_lowers_the_loss_and_saves_an_adapter_peft_loads(plugin, tiny_model_dir, prefs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    extra = ["simpo.beta=2.0"] if plugin == "simpo" else []  # the paper's scale: TRL's 0.1 learns slowly
    opts = overrides(tiny_model_dir, prefs, tmp_path / "out", *LORA, "train.max_steps=6", "train.lr=2e-2", *extra)
    summary = train(*configure(None, ["lora", plugin], opts))
    steps = [r for r in records(tmp_path / "out") if "loss" in r and "step" in r and "eval_loss" not in r]
    assert len(steps) == 6 and steps[-1]["loss"] < steps[0]["loss"] - 0.05, [r["loss"] for r in steps]
    assert steps[-1]["reward_margin"] > steps[0]["reward_margin"]
    assert {"rewards_chosen", "rewards_rejected", "reward_accuracy", "nll_loss"} <= set(steps[0])

    ours, tokenizer, _ = load_for_inference(str(tiny_model_dir), {"trained": summary["saved"]})
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), summary["saved"]).eval()
    ids = torch.tensor([tokenizer("Reverse: kappa")["input_ids"]])
    with torch.no_grad():
        expected, theirs = ours(input_ids=ids).logits, peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            untrained = peft_model(input_ids=ids).logits
    assert (expected - untrained).abs().max() > 1e-3, "the adapter trained"
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=0)


def test_orpo_composes_with_full_and_qlora(tmp_path, prefs):
    """Both construct and take steps; qlora needs widths its 4-bit blocks divide."""
    model_dir = save_tiny_model(tmp_path / "model64", hidden_size=64)
    for plugins in (["full", "orpo"], ["lora", "qlora", "orpo"]):
        out = tmp_path / "-".join(plugins)
        summary = train(*configure(None, plugins, overrides(model_dir, prefs, out, "train.max_steps=2", "train.lr=1e-3")))
        losses = [r["loss"] for r in records(out) if "loss" in r and "eval_loss" not in r]
        assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), plugins
        assert summary["saved"].is_dir()


# --------------------------------------------------------------------------------------------
# bad data and configuration
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_only(tiny_model_dir, tmp_path_factory):
    """The tiny model's directory without its weights: a run that reached the weights would fail."""
    path = tmp_path_factory.mktemp("tokenizer-only")
    for item in tiny_model_dir.iterdir():
        if item.suffix != ".safetensors":
            (path / item.name).write_bytes(item.read_bytes())
    return path


@pytest.mark.parametrize("plugin", ["orpo", "simpo"])
def test_a_row_without_rejected_names_file_line_and_field_before_the_model_loads(plugin, tokenizer_only, tmp_path):
    rows = preference_rows(3)
    del rows[1]["rejected"]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=f"{bad}:2: missing field 'rejected'"):
        train(*configure(None, ["lora", plugin], overrides(tokenizer_only, bad, tmp_path / "out", *LORA)))


@pytest.mark.parametrize("plugin", ["orpo", "simpo"])
def test_sft_rows_are_told_apart_naming_the_plugin(plugin, tokenizer_only, tmp_path):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(DataError) as error:
        train(*configure(None, ["lora", plugin], overrides(tokenizer_only, sft, tmp_path / "out", *LORA)))
    message = str(error.value)
    assert f"the {plugin} plugin expects preference rows" in message and f"without --plugin {plugin}" in message


@pytest.mark.parametrize(
    "plugin, extra, message",
    [
        ("orpo", ["orpo.beta=0"], "orpo.beta: Input should be greater than 0"),
        ("simpo", ["simpo.cpo_alpha=-1"], "simpo.cpo_alpha: Input should be greater than or equal to 0"),
        ("simpo", ["simpo.label_smoothing=0.5"], "simpo.label_smoothing: Input should be less than 0.5"),
        ("orpo", ["train.packing=true"], "train.packing: the orpo plugin scores each chosen/rejected pair"),
        ("simpo", ["data.fields.prompt=question"], "data.fields: the simpo plugin reads preference rows"),
    ],
)
def test_config_errors_name_the_key(plugin, extra, message, tiny_model_dir, prefs, tmp_path):
    with pytest.raises(ConfigError, match=message):
        configure(None, ["lora", plugin], overrides(tiny_model_dir, prefs, tmp_path / "out", *extra))
