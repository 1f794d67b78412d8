"""GRPO (plugin ``grpo``): the loss and its gradients equal TRL's ``GRPOTrainer._compute_loss`` for
every loss type on the same completions; runs sample, score and train with lora, dora and
full; ``num_iterations`` reuses a generation batch; resume is exact; 2 processes give 1's
loss; bad rewards, data and configs stop with a message naming the function, row or key."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from ftengine import hookimpl
from ftengine.build import configure
from ftengine.errors import ConfigError, DataError, FtengineError
from ftengine.loop import train
from ftengine.plugins.grpo import GrpoOptions, advantages, per_token_logps, policy_loss
from ftengine.testing import KillAfter, save_tiny_model, tiny_model, write_jsonl

REWARDS = "tests.sample_plugins.grpo_rewards"
LETTERS = "abcdefgh"


def prompt_rows(n, **extra):
    return [{"prompt": f"Write the letter {LETTERS[i % 8]}", "letter": LETTERS[i % 8], **extra} for i in range(n)]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("grpo") / "prompts.jsonl", prompt_rows(8))


def grpo_overrides(model_dir, data, out, *extra):
    return [
        f"model={model_dir}",
        f"data.train={data}",
        f"output_dir={out}",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.lr=1e-2",
        "grpo.num_generations=4",
        "grpo.max_completion_length=6",
        *extra,
    ]


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_records(out):
    return [r for r in records(out) if "loss" in r]


# --------------------------------------------------------------------------------------------
# parity with TRL
# --------------------------------------------------------------------------------------------


def fixed_completions(seed=0, rows=4, prompt_width=5, completion_width=5):
    """Left-padded prompts and right-padded completions of a tiny model's vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(0, 250, (rows, prompt_width), generator=generator)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[1, :2] = 0  # left padding
    completion_ids = torch.randint(0, 250, (rows, completion_width), generator=generator)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[0, 3:] = 0  # a completion that ended early
    completion_mask[2, 1:] = 0
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def trl_trainer(model, tmp_path, **options):
    """A ``GRPOTrainer`` with just what ``_compute_loss`` reads, built from a real ``GRPOConfig``."""
    from accelerate import Accelerator
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer import add_fused_lm_head

    args = GRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **options)
    trainer = GRPOTrainer.__new__(GRPOTrainer)
    add_fused_lm_head(model, temperature=args.temperature, outputs=("log_probs", "entropy"))
    trainer.model, trainer.args, trainer.accelerator = model, args, Accelerator(cpu=True)
    trainer.loss_type, trainer.beta, trainer.temperature = args.loss_type, args.beta, args.temperature
    trainer.epsilon_low = args.epsilon
    trainer.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    trainer.importance_sampling_level, trainer.top_entropy_quantile = "token", 1.0
    trainer.off_policy_mask_threshold, trainer.use_vllm = None, False
    trainer.aux_loss_enabled, trainer._entropy_bonus_enabled = False, False
    trainer.max_completion_length, trainer.current_gradient_accumulation_steps = args.max_completion_length, 1
    trainer._metrics = {"train": __import__("collections").defaultdict(list)}
    return trainer


@pytest.mark.parametrize(
    "loss_type, beta", [("grpo", 0.0), ("bnpo", 0.0), ("dr_grpo", 0.0), ("dapo", 0.0), ("dapo", 0.04), ("grpo", 0.04)]
)
def test_loss_and_gradients_equal_trl_for_each_loss_type(loss_type, beta, tmp_path):
    options = dict(loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=0.28, max_completion_length=6, temperature=0.9)
    ours_model = tiny_model(seed=1).train()
    theirs_model = copy.deepcopy(ours_model)
    prompt_ids, prompt_mask, completion_ids, completion_mask = tensors = fixed_completions()
    adv = torch.tensor([1.2, -0.7, 0.3, -0.8])
    with torch.no_grad():  # old and reference log-probs apart from the policy's, so clipping and KL act
        base = per_token_logps(ours_model, *tensors, 0.9)
        old = base + 0.3 * torch.randn(base.shape, generator=torch.Generator().manual_seed(2))
        ref = base - 0.2 * torch.randn(base.shape, generator=torch.Generator().manual_seed(3))

    logps = per_token_logps(ours_model, *tensors, 0.9)
    loss_sum, count, _, clipped = policy_loss(GrpoOptions(**options), logps, old, ref, adv, completion_mask)
    (loss_sum / count).backward()
    assert clipped.any()

    trainer = trl_trainer(theirs_model, tmp_path, num_generations=2, **options)
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": completion_mask.sum(),
    }
    theirs = trainer._compute_loss(theirs_model, inputs)
    theirs.backward()
    torch.testing.assert_close(loss_sum / count, theirs, rtol=1e-5, atol=1e-7)
    for (name, ours_param), theirs_param in zip(ours_model.named_parameters(), theirs_model.parameters()):
        torch.testing.assert_close(
            ours_param.grad, theirs_param.grad, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_advantages_are_normalised_as_trl_does():
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, 2.0, 4.0, 0.0, 3.0, 3.0, 3.0, 3.0])
    groups = rewards.view(-1, 4)
    centred = (groups - groups.mean(1, keepdim=True)).view(-1)
    group_std = nanstd(groups, dim=1).repeat_interleave(4)
    scaled, zero_std = advantages(rewards, 4, "group")
    torch.testing.assert_close(scaled, centred / (group_std + 1e-4))
    assert zero_std.tolist() == [False] * 4 + [True] * 4
    torch.testing.assert_close(advantages(rewards, 4, "batch")[0], centred / (nanstd(rewards) + 1e-4))
    torch.testing.assert_close(advantages(rewards, 4, "none")[0], centred)


# --------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------


class CountingReward:
    """A reward of 0 that counts the completions it scores: how often the run generated."""

    def __init__(self):
        self.scored = []

    @hookimpl
    def ftengine_rewards(self):
        return {"counted": self.reward}

    def reward(self, prompts, completions, rows):
        self.scored.append(len(completions))
        return [0.0] * len(completions)


@pytest.fixture(scope="module")
def resumed_runs(tiny_model_dir, prompts, tmp_path_factory):
    """An uninterrupted lora run with a KL term and 2 steps per generation batch (its rewards
    counted), and the same run stopped after its step-2 checkpoint and resumed."""
    root = tmp_path_factory.mktemp("grpo-resume")
    common = ["train.max_steps=3", "train.save_every=2", "grpo.num_iterations=2", "grpo.beta=0.04"]
    plugins = ["lora", "grpo", REWARDS]
    config, pm = configure(None, plugins, grpo_overrides(tiny_model_dir, prompts, root / "straight", *common))
    counting = CountingReward()
    pm.register(counting)
    train(config, pm)
    config, pm = configure(None, plugins, grpo_overrides(tiny_model_dir, prompts, root / "resumed", *common))
    pm.register(KillAfter(2))
    with pytest.raises(KeyboardInterrupt):
        train(config, pm)
    train(*configure(None, plugins, grpo_overrides(tiny_model_dir, prompts, root / "resumed", *common)), resume=True)
    return root / "straight", root / "resumed", counting.scored


def test_a_run_logs_rewards_lengths_clipping_and_kl(resumed_runs):
    first = step_records(resumed_runs[0])[0]
    for key in (
        "reward",
        "rewards_short_mean",
        "rewards_short_std",
        "rewards_picky_mean",
        "frac_reward_zero_std",
        "completion_length",
        "clip_ratio",
        "kl",
    ):
        assert key in first and first[key] is not None, key
    assert 0 < first["completion_length"] <= 6
    assert (resumed_runs[0] / "final" / "adapter_model.safetensors").is_file()


def test_num_iterations_trains_several_steps_on_one_generation_batch(resumed_runs):
    straight, _, scored = resumed_runs
    assert scored == [8, 8]  # steps 1 and 3 generate 2 prompts x 4; step 2 trains on step 1's
    steps = step_records(straight)
    assert steps[0]["reward"] == steps[1]["reward"]
    assert steps[0]["loss"] != steps[1]["loss"]  # the second step's ratios move off 1
    assert steps[0]["kl"] == 0 and steps[1]["kl"] > 0


def test_resume_reproduces_the_uninterrupted_run(resumed_runs):
    straight, resumed = (step_records(out) for out in resumed_runs[:2])
    assert [r["step"] for r in resumed] == [1, 2, 3]
    keys = ("loss", "grad_norm", "reward", "kl")
    assert [{k: r[k] for k in keys} for r in resumed] == [{k: r[k] for k in keys} for r in straight]


@pytest.mark.parametrize("eval_generations, scored, logs_loss", [(None, [8, 32], True), (2, [8, 16], True), (0, [8], False)])
def test_evaluation_samples_num_generations_eval_per_prompt(
    eval_generations, scored, logs_loss, tiny_model_dir, prompts, tmp_path
):
    """Evaluating the 8 prompts samples num_generations_eval completions of each (default:
    num_generations); 0 samples none and logs no eval loss, leaving it to the task's metrics."""
    extra = ["train.max_steps=1", f"data.eval={prompts}", "train.eval_batch_size=8"]
    if eval_generations is not None:
        extra.append(f"grpo.num_generations_eval={eval_generations}")
    config, pm = configure(None, ["lora", "grpo", REWARDS], grpo_overrides(tiny_model_dir, prompts, tmp_path / "out", *extra))
    counting = CountingReward()
    pm.register(counting)
    train(config, pm)
    assert counting.scored == scored
    (evaluation,) = [r for r in records(tmp_path / "out") if "eval_time_s" in r]
    assert ("eval_loss" in evaluation) is logs_loss and ("eval_reward" in evaluation) is logs_loss


def test_one_eval_generation_is_a_config_error(tiny_model_dir, prompts, tmp_path):
    overrides = grpo_overrides(tiny_model_dir, prompts, tmp_path / "out", "grpo.num_generations_eval=1")
    with pytest.raises(ConfigError, match="num_generations_eval=1"):
        configure(None, ["lora", "grpo", REWARDS], overrides)


@pytest.mark.parametrize("method", ["full", "dora", "qlora"])
def test_composes_with_full_dora_and_qlora(method, tiny_model_dir, prompts, tmp_path):
    plugins = {"full": ["full"], "dora": ["lora", "dora"], "qlora": ["lora", "qlora"]}[method]
    # qlora's 4-bit blocks need widths they divide; its reference forward runs the NF4 base.
    model_dir = save_tiny_model(tmp_path / "model64", hidden_size=64) if method == "qlora" else tiny_model_dir
    overrides = grpo_overrides(model_dir, prompts, tmp_path / "out", "train.max_steps=1", "grpo.beta=0.04")
    summary = train(*configure(None, [*plugins, "grpo", REWARDS], overrides))
    (record,) = step_records(tmp_path / "out")
    assert torch.isfinite(torch.tensor(record["loss"])) and record["grad_norm"] > 0
    assert summary["saved"]


def test_two_processes_give_the_loss_of_one(tiny_model_dir, prompts, tmp_path):
    opts = grpo_overrides(tiny_model_dir, prompts, tmp_path / "one", "train.max_steps=1", "lora.dropout=0")
    train(*configure(None, ["lora", "grpo", REWARDS], opts))
    two = [o.replace(str(tmp_path / "one"), str(tmp_path / "two")) for o in opts]
    args = [sys.executable, "-m", "ftengine.cli", "run", "--plugin", "lora", "--plugin", "ddp", "--plugin", "grpo"]
    args += ["--plugin", REWARDS, *(x for o in two for x in ("-o", o)), "--nproc", "2"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    (one,), (both,) = step_records(tmp_path / "one"), step_records(tmp_path / "two")
    # On-policy the loss is about 0 (advantages centre on 0): its gradients carry the check.
    assert both["loss"] == pytest.approx(one["loss"], abs=1e-6)
    for key in ("grad_norm", "reward", "completion_length"):
        assert both[key] == pytest.approx(one[key], rel=1e-5), key


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_no_reward_function_is_a_config_error(tiny_model_dir, prompts, tmp_path):
    with pytest.raises(ConfigError, match="no active plugin gives a reward function"):
        configure(None, ["lora", "grpo"], grpo_overrides(tiny_model_dir, prompts, tmp_path))


def test_two_plugins_giving_one_reward_name_is_a_config_error_naming_both(tiny_model_dir, prompts, tmp_path):
    plugins = ["lora", "grpo", REWARDS, "tests.sample_plugins.grpo_rewards_twin"]
    with pytest.raises(
        ConfigError, match="plugins 'grpo_rewards' and 'grpo_rewards_twin' both give a reward function named 'short'"
    ):
        configure(None, plugins, grpo_overrides(tiny_model_dir, prompts, tmp_path))


def test_a_reward_weight_naming_no_function_is_a_config_error(tiny_model_dir, prompts, tmp_path):
    overrides = grpo_overrides(tiny_model_dir, prompts, tmp_path, "grpo.reward_weights.shrot=2")
    with pytest.raises(
        ConfigError, match=r"grpo.reward_weights.shrot: no reward function has this name \(the active ones: picky, short\)"
    ):
        configure(None, ["lora", "grpo", REWARDS], overrides)


def test_one_completion_per_prompt_is_a_config_error(tiny_model_dir, prompts, tmp_path):
    with pytest.raises(ConfigError, match="num_generations"):
        configure(None, ["lora", "grpo", REWARDS], grpo_overrides(tiny_model_dir, prompts, tmp_path, "grpo.num_generations=1"))


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "x" * 400}], r"no prompt left .* raise train.max_length"),
        ([{"prompt": "ok"}, {"messages": [{"role": "assistant", "content": "b"}]}], r":2: 'messages' must end with a user turn"),
    ],
)
def test_bad_prompt_data_stops_before_the_model_loads(rows, message, tiny_model_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    config, pm = configure(
        None, ["lora", "grpo", REWARDS], grpo_overrides(tiny_model_dir, data, tmp_path / "out", "train.max_length=64")
    )
    monkeypatch.setattr("ftengine.loop.build", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(DataError, match=message):
        train(config, pm)


@pytest.mark.parametrize(
    "fail, message",
    [
        (
            "raise",
            r"reward function 'picky' raised ValueError: this row asks me to fail \(scoring the completions of .*bad.jsonl:2\)",
        ),
        ("nan", r"reward function 'picky' returned nan for completion 4 \(prompt .*bad.jsonl:2\)"),
        (
            "count",
            r"reward function 'picky' returned 7 values for 8 completions \(of the prompts .*bad.jsonl:1 to .*bad.jsonl:2\)",
        ),
    ],
)
def test_a_failing_reward_function_stops_the_step_naming_it_and_the_row(fail, message, tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [prompt_rows(1)[0], prompt_rows(1, fail=fail)[0]])
    config, pm = configure(
        None, ["lora", "grpo", REWARDS], grpo_overrides(tiny_model_dir, data, tmp_path / "out", "train.max_steps=1")
    )
    with pytest.raises(FtengineError, match=message):
        train(config, pm)
    assert not (tmp_path / "out" / "final").exists()
