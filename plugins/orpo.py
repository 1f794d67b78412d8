"""ORPO, odds-ratio preference optimisation (Hong et al. 2024): SFT and preference in one loss,
with no reference model.

    ftengine run prefs.yaml --plugin lora --plugin orpo -o orpo.beta=0.1

Data: the ``dpo`` plugin's preference rows (``{"prompt", "chosen", "rejected"}``, strings or
chats), loaded and tokenised by ``ftengine.plugins.dpo``. Every micro-batch is one forward pass
over ``[chosen rows; rejected rows]``.

With ``log p̄`` the log-probability of an answer averaged over its tokens, per pair::

    log_odds = (log p̄_w − log p̄_l) − (log(1 − p̄_w) − log(1 − p̄_l))
    loss     = nll − beta · log σ(log_odds)

where ``nll`` is the cross-entropy of the chosen rows averaged over the micro-batch's tokens of
prompt *and* answer, as TRL's ``ORPOTrainer`` computes it (the paper's code trains on the prompt
too). The loss is a sum over pairs with the number of pairs as the count (``docs/preferences.md``).
"""

import torch
import torch.nn.functional as F
from ftengine import hookimpl
from ftengine.config import Section
from ftengine.data import IGNORE_INDEX
from ftengine.modeling import target_logits
from ftengine.plugins.dpo import load_preferences, pair_data_problems, pair_metrics
from ftengine.state import LossOutput
from pydantic import Field, PositiveFloat

ftengine_plugin_api = 1


class OrpoOptions(Section):
    beta: PositiveFloat = Field(
        0.1, description="weight of the odds-ratio term against the SFT loss (the paper's lambda; TRL's beta)"
    )


def log1mexp(x):
    """``log(1 - exp(x))`` for ``x < 0``, without cancellation on either side of ``-log 2``."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_logps(model, batch):
    """``(chosen, rejected, nll)`` from one forward pass over a pair batch: the answers'
    log-probabilities averaged over their tokens, and the chosen rows' cross-entropy averaged
    over all their tokens (prompt included)."""
    # Every token is a target, so the logits of every position come back (also where the model
    # takes logits_to_keep): the answers' tokens are picked out of them with the labels.
    every_token = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    logits, targets = target_logits(model, {**batch, "labels": every_token})
    token_logps = -F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    answer = batch["labels"][:, 1:] != IGNORE_INDEX
    average = (token_logps * answer).sum(dim=1) / answer.sum(dim=1)
    chosen, rejected = average.chunk(2)
    chosen_tokens = targets[: len(chosen)] != IGNORE_INDEX
    nll = -(token_logps[: len(chosen)] * chosen_tokens).sum() / chosen_tokens.sum()
    return chosen, rejected, nll


def odds_ratio_terms(chosen, rejected):
    """``(log σ(log_odds), log_odds)`` per pair, from average log-probabilities (fp32)."""
    chosen, rejected = chosen.float(), rejected.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return F.logsigmoid(log_odds), log_odds


@hookimpl
def ftengine_config_section(register):
    register("orpo", OrpoOptions)


@hookimpl
def ftengine_validate(config):
    return pair_data_problems(config, "orpo", "an answer's log-probability is averaged over its own row")


@hookimpl
def ftengine_load_dataset(config, tokenizer):
    return load_preferences(config, tokenizer, plugin="orpo")


@hookimpl
def ftengine_compute_loss(model, batch, state):
    options = state.config.orpo
    chosen, rejected, nll = orpo_logps(model, batch)
    log_sigmoid_odds, log_odds = odds_ratio_terms(chosen, rejected)
    pairs = len(chosen)
    # TRL's loss is nll - beta * mean(log σ); as a sum over pairs, nll counts once per pair.
    loss = pairs * nll - options.beta * log_sigmoid_odds.sum()
    # No reference model: the rewards are beta times the average log-probabilities.
    metrics = pair_metrics(options, (chosen, rejected), (0.0, 0.0))
    metrics |= {
        "nll_loss": pairs * float(nll.detach()),
        "log_odds_ratio": float(log_sigmoid_odds.detach().sum()),
        "log_odds_chosen": float(log_odds.detach().sum()),
    }
    return LossOutput(loss=loss, count=pairs, metrics=metrics)
