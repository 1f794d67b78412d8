"""Group Relative Policy Optimisation (Shao et al. 2024) with rewards from plugins, as TRL's ``GRPOTrainer``.

    ftengine run job.yaml --plugin lora --plugin grpo --plugin my_rewards -o grpo.num_generations=8

Data: JSONL prompt rows, ``{"prompt": "..."}`` or ``{"messages": [...]}`` ending in a user turn
(or in an assistant turn after it: a reference answer, left out of the prompt); the whole row
reaches the reward functions (``rows``: an expected answer in any field).

Each micro-batch of ``train.batch_size`` prompts generates ``grpo.num_generations`` completions
per prompt from the current policy (dropout off, adapters on; the KV-cached, left-padded
sampling loop of ``ftengine.serving``, each completion seeded by ``train.seed``, the step and
the prompt, so ``--resume`` and any number of processes draw the same ones). The reward functions
of every active plugin (hook ``ftengine_rewards``) score them; their weighted sum, normalised
within each prompt's group, is the advantage of every token of a completion. The loss is the
clipped policy-ratio objective, plus ``beta`` times the KL to the reference (the model with its
adapters off; for ``full``, a frozen copy), aggregated as ``grpo.loss_type`` says (TRL's names).

With ``num_iterations`` > 1 the generation batch of a step is kept, with the log-probs the
policy gave it then, for that many optimiser steps (``Datasets.steps_per_batch``).
"""

import hashlib
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from ftengine import hookimpl
from ftengine.config import Section
from ftengine.data import (
    BadRows,
    encode_chat_text,
    load_splits,
    pad_batch,
    read_rows,
    render_prompt,
    require_messages,
    require_str,
)
from ftengine.errors import DataError, FtengineError
from ftengine.evaluation import adapters_off
from ftengine.modeling import eval_mode, inner_model
from ftengine.plugins.dpo import frozen_copy
from ftengine.serving import Row, SamplingParams, generate_rows
from ftengine.state import LossOutput
from pydantic import Field

ftengine_plugin_api = 1

PROMPT_FORMAT = '{"prompt": "..."} or {"messages": [..., {"role": "user", "content": "..."}]}'
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


class RewardError(FtengineError):
    """A reward function failed: it raised, returned another number of values than
    completions, or a value that is not a finite number."""


class GrpoOptions(Section):
    num_generations: int = Field(
        8, ge=2, description="completions sampled per prompt (a group); a micro-batch has train.batch_size x this"
    )
    num_generations_eval: int | None = Field(
        None,
        ge=0,
        description="completions per prompt in evaluation (default: num_generations); 0 computes no eval loss or "
        "rewards, leaving evaluation to the task's metrics (an on-policy GRPO loss is ~0 by construction)",
    )
    max_completion_length: int = Field(256, ge=1, description="most tokens generated per completion")
    temperature: float = Field(
        1.0, gt=0, le=2, description="sampling temperature (log-probs are computed at it too, as TRL does)"
    )
    top_p: float = Field(
        1.0, gt=0, le=1, description="nucleus sampling: keep the smallest set of tokens reaching this probability"
    )
    top_k: int = Field(0, ge=0, description="sample among the k most likely tokens (0: all)")
    stop: list[str] = Field(
        default_factory=list, max_length=4, description="stop strings: the completion text ends before the first"
    )
    loss_type: Literal[LOSS_TYPES] = Field(
        "dapo",
        description="how per-token losses aggregate (TRL's names): grpo = mean per completion, then over completions; "
        "bnpo = over the tokens of each micro-batch; dr_grpo = token sum / (completions x max_completion_length); "
        "dapo = over all tokens of the step",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="divide advantages by the reward std of the group, of the micro-batch, or not at all (Dr. GRPO)"
    )
    epsilon: float = Field(0.2, gt=0, description="lower clipping bound of the policy ratio: 1 - epsilon")
    epsilon_high: float | None = Field(
        None, gt=0, description="upper clipping bound: 1 + epsilon_high (default: epsilon; DAPO: 0.28)"
    )
    beta: float = Field(0.0, ge=0, description="weight of the KL to the reference model; 0 runs no reference forward")
    use_bias_correction_kl: bool = Field(
        True, description="multiply the KL term by the policy ratio (the unbiased reverse-KL gradient; TRL's default)"
    )
    num_iterations: int = Field(1, ge=1, description="optimiser steps per generation batch (mu in the paper)")
    mask_truncated_completions: bool = Field(False, description="leave completions cut at max_completion_length out of the loss")
    reward_weights: dict[str, float] = Field(
        default_factory=dict, description="weight of each reward function, by name (missing names weigh 1)"
    )


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def prompt_messages(row, where):
    """The chat messages of a prompt row, ending in a user turn."""
    if row.get("messages") is not None:
        messages = require_messages(row["messages"], "messages", where)
        if messages and messages[-1]["role"] == "assistant":  # a reference answer: for the rewards, not the prompt
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise DataError(
                f"{where}: 'messages' must end with a user turn (the prompt to answer), or with one assistant turn "
                f"after it (a reference answer, which the rewards see in the row); drop the other trailing turns"
            )
        return messages
    if row.get("prompt") is None:
        keys = sorted(k for k, v in row.items() if v is not None)
        raise DataError(f"{where}: the grpo plugin expects prompt rows {PROMPT_FORMAT}; got keys {keys}")
    return [{"role": "user", "content": require_str(row, "prompt", where)}]


def load_prompt_file(path, tokenizer, max_prompt_length, split, options=None):
    """``(examples, stats)``: the token ids of each prompt as the model sees it. A prompt longer
    than ``max_prompt_length`` tokens is dropped and counted; bad rows are reported together."""
    examples, dropped, bad = [], 0, BadRows(path)
    for row, where in read_rows(path, options, expected=PROMPT_FORMAT):
        with bad.check():
            messages = prompt_messages(row, where)
            if tokenizer.chat_template:
                text = render_prompt(tokenizer, messages)
                ids = encode_chat_text(tokenizer, text)["input_ids"]
            else:  # no template: the prompt text as it is
                text = "\n".join(m["content"] for m in messages)
                ids = tokenizer(text)["input_ids"]
            if len(ids) > max_prompt_length:
                dropped += 1
                continue
            examples.append({"prompt_ids": ids, "prompt": str(text), "row": row, "source": where, "index": len(examples)})
    bad.raise_if_any()
    if not examples:
        raise DataError(
            f"{path}: no prompt left (every one is longer than train.max_length - grpo.max_completion_length = "
            f"{max_prompt_length} tokens); raise train.max_length or shorten the prompts"
        )
    return examples, {"rows": len(examples) + dropped, "truncated": 0, "dropped": dropped}


def collate_prompts(examples):
    return {
        "prompt_ids": [e["prompt_ids"] for e in examples],
        "prompts": [e["prompt"] for e in examples],
        "rows": [e["row"] for e in examples],
        "sources": [e["source"] for e in examples],
        "index": torch.tensor([e["index"] for e in examples]),
    }


# --------------------------------------------------------------------------------------------
# rewards
# --------------------------------------------------------------------------------------------


def reward_functions(pm, config):
    """``({name: function}, problems)`` from every active plugin's ``ftengine_rewards``."""
    functions, owners, problems = {}, {}, []
    for impl in pm.hook.ftengine_rewards.get_hookimpls():
        given = impl.function(**({"config": config} if "config" in impl.argnames else {})) or {}
        if not isinstance(given, dict) or not all(isinstance(n, str) and callable(f) for n, f in given.items()):
            problems.append(f"plugin '{impl.plugin_name}': ftengine_rewards returned {given!r}; return {{name: function}}")
            continue
        for name, function in given.items():
            if name in functions:
                problems.append(
                    f"plugins '{owners[name]}' and '{impl.plugin_name}' both give a reward function named '{name}': "
                    f"rename one, or select only one of them"
                )
            functions[name], owners[name] = function, impl.plugin_name
    return functions, problems


def score(functions, weights, prompts, completions, rows, sources):
    """``(total, per_function)``: the weighted sum of every function's rewards ``[N]``, and each
    function's own ``{name: [N]}``. A failing function raises ``RewardError`` naming it and the row."""
    per_function = {}
    for name, function in functions.items():
        try:
            values = list(function(prompts, completions, rows))
        except Exception as exc:
            raise RewardError(
                f"reward function '{name}' raised {type(exc).__name__}: {exc} (scoring the completions of "
                f"{failing_row(function, prompts, completions, rows, sources)}); fix the function or that row"
            ) from exc
        if len(values) != len(completions):
            raise RewardError(
                f"reward function '{name}' returned {len(values)} values for {len(completions)} completions (of the prompts "
                f"{sources[0]} to {sources[-1]}); it must return one float per completion"
            )
        for i, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise RewardError(
                    f"reward function '{name}' returned {value!r} for completion {i} (prompt {sources[i]}); "
                    f"it must return a finite number for every completion"
                )
        per_function[name] = torch.tensor(values, dtype=torch.float32)
    total = sum(weights.get(name, 1.0) * values for name, values in per_function.items())
    return total, per_function


def failing_row(function, prompts, completions, rows, sources):
    """The source of the first completion on which ``function`` raises alone (the batch's first if none does)."""
    for i in range(len(completions)):
        try:
            function(prompts[i : i + 1], completions[i : i + 1], rows[i : i + 1])
        except Exception:
            return sources[i]
    return sources[0]


def advantages(rewards, num_generations, scale_rewards):
    """``(advantages, zero_std)``: rewards minus their group's mean, divided by the group's (or
    the batch's) std + 1e-4 unless ``scale_rewards`` is ``none``; ``zero_std`` marks completions
    whose group's rewards do not spread, as TRL computes them (std with Bessel's correction)."""
    groups = rewards.view(-1, num_generations)
    centred = (groups - groups.mean(dim=1, keepdim=True)).view(-1)
    group_std = groups.std(dim=1).repeat_interleave(num_generations)
    std = rewards.std().expand_as(rewards) if scale_rewards == "batch" else group_std
    scaled = centred if scale_rewards == "none" else centred / (std + 1e-4)
    return scaled, torch.isclose(std, torch.zeros_like(std))


# --------------------------------------------------------------------------------------------
# log-probabilities and the loss
# --------------------------------------------------------------------------------------------


def per_token_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature):
    """``[N, C]``: the log-probability of each completion token given what precedes it, the
    logits divided by ``temperature`` (as sampled). Prompts are left-padded, completions right-padded."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    width = completion_ids.shape[1]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=width + 1).logits[:, :-1]
    logps = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logps.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)


def policy_loss(options, logps, old_logps, ref_logps, advantages, mask):
    """``(loss_sum, count, per_token_kl, clipped)`` of one micro-batch, TRL's ``_compute_loss``.

    ``loss_sum / count`` is TRL's loss of the micro-batch; summed over the micro-batches (and
    processes) of a step first, the count makes each ``loss_type`` aggregate as TRL's does
    over its gradient accumulation: ``grpo``, ``dr_grpo`` count completions, ``bnpo`` counts
    1 (a mean per micro-batch), ``dapo`` counts the step's tokens.
    """
    mask = mask.float()
    advantages = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    high = options.epsilon if options.epsilon_high is None else options.epsilon_high
    clipped_ratio = torch.clamp(ratio, 1 - options.epsilon, 1 + high)
    per_token = -torch.min(ratio * advantages, clipped_ratio * advantages)
    per_token_kl = None
    if options.beta:
        per_token_kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        if options.use_bias_correction_kl:
            per_token_kl = per_token_kl * ratio
        per_token = per_token + options.beta * per_token_kl
    clipped = ((ratio < 1 - options.epsilon) & (advantages < 0)) | ((ratio > 1 + high) & (advantages > 0))
    token_sum = (per_token * mask).sum()
    if options.loss_type == "grpo":
        loss_sum, count = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum(), len(mask)
    elif options.loss_type == "bnpo":
        loss_sum, count = token_sum / mask.sum().clamp(min=1.0), 1
    elif options.loss_type == "dr_grpo":
        loss_sum, count = token_sum / options.max_completion_length, len(mask)
    else:  # dapo
        loss_sum, count = token_sum, int(mask.sum())
    return loss_sum, count, per_token_kl, clipped


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------


def completion_seed(seed, generation_round, example_index, generation):
    """The seed of one completion: the same for the same run seed, round, prompt and draw,
    whichever process or resumed run draws it."""
    digest = hashlib.sha256(f"grpo:{seed}:{generation_round}:{example_index}:{generation}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class Generation:
    """One micro-batch's completions, scored: what ``num_iterations`` steps train on."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    advantages: torch.Tensor
    metrics: dict
    old_logps: torch.Tensor | None = None


def generate(model, tokenizer, batch, state, generation_round, group):
    """Sample ``group`` completions of every prompt of ``batch`` with ``model``."""
    options, device = state.config.grpo, state.device
    params = SamplingParams(
        max_tokens=options.max_completion_length,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k,
        stop=tuple(options.stop),
    )
    rows = []
    for prompt_ids, index in zip(batch["prompt_ids"], batch["index"].tolist()):
        for g in range(group):
            generator = torch.Generator(device=device).manual_seed(
                completion_seed(state.config.train.seed, generation_round, index, g)
            )
            rows.append(Row(list(prompt_ids), None, params, index=len(rows), generator=generator))
    with torch.no_grad(), eval_mode(model):
        return generate_rows(model, tokenizer, rows)


def score_generation(rows, batch, run, state, repeat):
    """The tensors and rewards of generated ``rows`` (``repeat`` per prompt of ``batch``)."""
    options, device, pad = state.config.grpo, state.device, run.tokenizer.pad_token_id or 0
    prompts = [p for p in batch["prompts"] for _ in range(repeat)]
    data_rows = [r for r in batch["rows"] for _ in range(repeat)]
    sources = [s for s in batch["sources"] for _ in range(repeat)]
    completions = [row.text for row in rows]
    rewards, per_function = score(run.rewards, options.reward_weights, prompts, completions, data_rows, sources)
    advantage, zero_std = advantages(rewards, repeat, options.scale_rewards)
    width = max(len(r.prompt_ids) for r in rows)
    prompt_ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=device)
    prompt_mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows], device=device)
    completion_ids = pad_batch([r.token_ids for r in rows], pad).to(device)
    completion_mask = pad_batch([[1] * len(r.token_ids) for r in rows], 0).to(device)
    truncated = torch.tensor([r.finish_reason == "length" for r in rows], device=device)
    if options.mask_truncated_completions:
        completion_mask = completion_mask * ~truncated.unsqueeze(1)
    lengths = torch.tensor([len(r.token_ids) for r in rows], dtype=torch.float32)
    metrics = {
        "reward": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "frac_reward_zero_std": float(zero_std.float().mean()),
        "completion_length": float(lengths.mean()),
        "truncated_ratio": float(truncated.float().mean()),
    }
    for name, values in per_function.items():
        metrics[f"rewards_{name}_mean"], metrics[f"rewards_{name}_std"] = float(values.mean()), float(values.std())
    return Generation(prompt_ids, prompt_mask, completion_ids, completion_mask, advantage.to(device), metrics)


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


@dataclass
class GrpoRun:
    """What the loss keeps across micro-batches: the rewards, the reference and the generation
    batch that ``num_iterations`` steps reuse."""

    rewards: dict
    tokenizer: object
    reference: torch.nn.Module | None = None  # full fine-tuning's frozen copy; None: adapters off
    cache: dict = field(default_factory=dict)  # micro-batch number within the step -> Generation
    cache_round: int | None = None
    step: int | None = None
    micro: int = 0

    def next_micro(self, step):
        if step != self.step:
            self.step, self.micro = step, 0
        self.micro += 1
        return self.micro - 1

    @torch.no_grad()
    def reference_logps(self, model, generation, state):
        args = (generation.prompt_ids, generation.prompt_mask, generation.completion_ids, generation.completion_mask)
        if self.reference is not None:
            return per_token_logps(self.reference, *args, state.config.grpo.temperature)
        with adapters_off(model, state), eval_mode(model):
            return per_token_logps(model, *args, state.config.grpo.temperature)


def grpo_run(state):
    if "grpo" not in state.plugin_data:
        raise FtengineError("grpo: ftengine_on_train_start must run before the first loss")
    return state.plugin_data["grpo"]


def generation_for(model, batch, state, run):
    """This micro-batch's scored generation: a new one at the first step of each round of
    ``num_iterations`` steps (and in evaluation), the round's kept one at the others."""
    options = state.config.grpo
    generation_round = state.step // options.num_iterations
    inner = inner_model(model)
    if not model.training:
        group = options.num_generations_eval or options.num_generations
        return score_generation(generate(inner, run.tokenizer, batch, state, generation_round, group), batch, run, state, group)
    micro = run.next_micro(state.step)
    if run.cache_round != generation_round:
        run.cache, run.cache_round = {}, generation_round
    if micro not in run.cache:
        group = options.num_generations
        generation = score_generation(
            generate(inner, run.tokenizer, batch, state, generation_round, group), batch, run, state, group
        )
        if options.num_iterations > 1:  # the log-probs of the policy that sampled, for the later steps' ratios
            with torch.no_grad(), eval_mode(inner):
                generation.old_logps = per_token_logps(
                    inner,
                    generation.prompt_ids,
                    generation.prompt_mask,
                    generation.completion_ids,
                    generation.completion_mask,
                    options.temperature,
                )
            run.cache[micro] = generation
        return generation
    return run.cache[micro]


# --------------------------------------------------------------------------------------------
# hooks
# --------------------------------------------------------------------------------------------


@hookimpl
def ftengine_config_section(register):
    register("grpo", GrpoOptions)


@hookimpl
def ftengine_validate(config, active, pm):
    options, problems = config.grpo, []
    functions, problems = reward_functions(pm, config)
    if not functions and not problems:
        problems.append(
            "grpo: no active plugin gives a reward function (hook ftengine_rewards); add one with --plugin "
            "(the contacts task's: --plugin contacts; your own: docs/rewards.md)"
        )
    for name in options.reward_weights:
        if name not in functions:
            problems.append(
                f"grpo.reward_weights.{name}: no reward function has this name (the active ones: "
                f"{', '.join(sorted(functions)) or 'none'}); fix the name or remove the key"
            )
    if options.num_generations_eval == 1:
        problems.append(
            "grpo.num_generations_eval=1: a group of one completion has no reward spread to learn or score from; "
            "use 0 (no eval loss) or at least 2"
        )
    if config.train.packing:
        problems.append("train.packing: grpo generates completions for each prompt and packs nothing; set train.packing: false")
    if options.max_completion_length >= config.train.max_length:
        problems.append(
            f"grpo.max_completion_length={options.max_completion_length} leaves no room for the prompt within "
            f"train.max_length={config.train.max_length}; lower it or raise train.max_length"
        )
    return problems


@hookimpl
def ftengine_load_dataset(config, tokenizer):
    max_prompt = config.train.max_length - config.grpo.max_completion_length
    datasets = load_splits(
        config,
        lambda path, split: load_prompt_file(path, tokenizer, max_prompt, split, config.data),
        collate_prompts,
        length=lambda example: len(example["prompt_ids"]),
    )
    datasets.steps_per_batch = config.grpo.num_iterations
    return datasets


@hookimpl
def ftengine_on_train_start(model, tokenizer, state):
    functions, problems = reward_functions(state.pm, state.config)
    if problems:
        raise FtengineError("; ".join(problems))
    run = GrpoRun(rewards=functions, tokenizer=tokenizer)
    if state.config.grpo.beta and state.adapter_name is None:  # full fine-tuning: no adapter to switch off
        run.reference = frozen_copy(model, state)
    state.plugin_data["grpo"] = run


@hookimpl
def ftengine_compute_loss(model, batch, state):
    options, run = state.config.grpo, grpo_run(state)
    if not model.training and options.num_generations_eval == 0:  # counts nothing: the core logs no eval loss
        return LossOutput(loss=torch.zeros((), device=state.device), count=0, metrics={})
    generation = generation_for(model, batch, state, run)
    logps = per_token_logps(
        model,
        generation.prompt_ids,
        generation.prompt_mask,
        generation.completion_ids,
        generation.completion_mask,
        options.temperature,
    )
    old_logps = logps.detach() if generation.old_logps is None else generation.old_logps
    ref_logps = run.reference_logps(model, generation, state) if options.beta else None
    loss_sum, count, per_token_kl, clipped = policy_loss(
        options, logps, old_logps, ref_logps, generation.advantages, generation.completion_mask
    )
    mask = generation.completion_mask.float()
    tokens = mask.sum().clamp(min=1.0)
    metrics = dict(generation.metrics, clip_ratio=float((clipped * mask).sum() / tokens))
    if per_token_kl is not None:
        metrics["kl"] = float((per_token_kl.detach() * mask).sum() / tokens)
    # Metrics are sums divided by the step's total count when logged: weigh each micro-batch's means by its count.
    return LossOutput(loss=loss_sum, count=count, metrics={k: v * count for k, v in metrics.items()})
