"""Supervised fine-tuning data and loss (default plugin).

Data: JSONL rows ``{"prompt", "response"}`` or ``{"messages": [...]}``; the loss covers the
response (assistant) tokens only. The loss is returned as a sum over target tokens with their
count, so the core normalises gradient accumulation by the total target tokens of the step.
"""

import torch.nn.functional as F
from ftengine import hookimpl
from ftengine.data import IGNORE_INDEX, collate_sft, load_sft_file, load_splits
from ftengine.modeling import target_logits
from ftengine.state import LossOutput

default = True


@hookimpl(trylast=True)
def ftengine_load_dataset(config, tokenizer):
    return load_splits(
        config,
        lambda path, split: load_sft_file(path, tokenizer, config.train.max_length),
        lambda examples: collate_sft(examples, tokenizer.pad_token_id),
    )


def token_nll_sum(logits, targets):
    """Summed cross-entropy of ``logits`` against ``targets`` (``IGNORE_INDEX`` skipped), and
    the number of targets it covers."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


@hookimpl(trylast=True)
def ftengine_compute_loss(model, batch, state):
    loss, count = token_nll_sum(*target_logits(model, batch))
    return LossOutput(loss=loss, count=count)
