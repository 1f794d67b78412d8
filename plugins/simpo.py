"""SimPO, simple preference optimisation (Meng et al. 2024): DPO's sigmoid loss on
length-averaged log-probabilities with a target margin, and no reference model.

    ftengine run prefs.yaml --plugin lora --plugin simpo -o simpo.beta=2.0 -o simpo.simpo_gamma=1.0

Data: the ``dpo`` plugin's preference rows (``{"prompt", "chosen", "rejected"}``, strings or
chats), loaded and tokenised by ``ftengine.plugins.dpo``. Every micro-batch is one forward pass
over ``[chosen rows; rejected rows]``.

With ``log p̄`` the log-probability of an answer averaged over its tokens and ε the label
smoothing, per pair::

    z    = beta · (log p̄_w − log p̄_l) − simpo_gamma
    loss = −(1 − ε)·log σ(z) − ε·log σ(−z) + cpo_alpha · nll

where ``nll`` is the cross-entropy of the chosen answers averaged over the micro-batch's answer
tokens (CPO-SimPO when ``cpo_alpha`` > 0). This is TRL's ``CPOTrainer`` with
``loss_type="simpo"``. The loss is a sum over pairs with the number of pairs as the count.
"""

from ftengine import hookimpl
from ftengine.config import Section
from ftengine.data import IGNORE_INDEX
from ftengine.plugins.dpo import DpoOptions, load_preferences, pair_data_problems, pair_losses, pair_metrics, sequence_logps
from ftengine.state import LossOutput
from pydantic import Field, NonNegativeFloat, PositiveFloat

ftengine_plugin_api = 1


class SimpoOptions(Section):
    beta: PositiveFloat = Field(
        0.1, description="scale of the reward beta * average log-prob (TRL's default; the SimPO paper uses 2.0 to 10)"
    )
    simpo_gamma: float = Field(0.5, description="target reward margin gamma between the chosen and rejected answers")
    cpo_alpha: NonNegativeFloat = Field(
        0.0, description="weight of the NLL of the chosen answers (0: SimPO; > 0: CPO-SimPO; TRL's CPOConfig defaults to 1.0)"
    )
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="assumed chance a preference is flipped (conservative loss)")


def simpo_losses(options, chosen, rejected):
    """Per-pair losses from average log-probs: DPO's sigmoid loss (with its label smoothing)
    on ``log p̄_w − log p̄_l − simpo_gamma / beta`` instead of on log-ratios."""
    sigmoid = DpoOptions(loss_type="sigmoid", beta=options.beta, label_smoothing=options.label_smoothing)
    return pair_losses(sigmoid, chosen - options.simpo_gamma / options.beta, rejected, None, None)


@hookimpl
def ftengine_config_section(register):
    register("simpo", SimpoOptions)


@hookimpl
def ftengine_validate(config):
    return pair_data_problems(config, "simpo", "an answer's log-probability is averaged over its own row")


@hookimpl
def ftengine_load_dataset(config, tokenizer):
    return load_preferences(config, tokenizer, plugin="simpo")


@hookimpl
def ftengine_compute_loss(model, batch, state):
    options = state.config.simpo
    chosen_sum, rejected_sum = sequence_logps(model, batch)
    chosen_tokens, rejected_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).chunk(2)
    chosen, rejected = chosen_sum / chosen_tokens, rejected_sum / rejected_tokens
    losses = simpo_losses(options, chosen, rejected)
    pairs = len(losses)
    nll = -chosen_sum.sum() / chosen_tokens.sum()
    # TRL's loss is mean(losses) + cpo_alpha * nll; as a sum over pairs, nll counts once per pair.
    loss = losses.sum() + options.cpo_alpha * pairs * nll
    # No reference model: the rewards are beta times the average log-probabilities.
    metrics = pair_metrics(options, (chosen, rejected), (0.0, 0.0)) | {"nll_loss": pairs * float(nll.detach())}
    return LossOutput(loss=loss, count=pairs, metrics=metrics)
