"""Supervised fine-tuning data and loss (default plugin).

Data: JSONL rows ``{"prompt", "response"}`` or ``{"messages": [...]}``; the loss covers the
response (assistant) tokens only. The loss is returned as a sum over target tokens with their
count, so the core normalises gradient accumulation by the total target tokens of the step.
"""

import inspect

import torch.nn.functional as F
from ftengine import hookimpl
from ftengine.data import IGNORE_INDEX, collate_sft, load_sft_file, load_splits
from ftengine.state import LossOutput

default = True


@hookimpl(trylast=True)
def ftengine_load_dataset(config, tokenizer):
    return load_splits(
        config,
        lambda path, split: load_sft_file(path, tokenizer, config.train.max_length),
        lambda examples: collate_sft(examples, tokenizer.pad_token_id),
    )


def token_logprob_sum(logits, labels):
    """Sum of cross-entropy over positions whose (shifted) label is not ignored, and its count."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((labels != IGNORE_INDEX).sum())


def _accepts_logits_to_keep(model):
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@hookimpl(trylast=True)
def ftengine_compute_loss(model, batch, state):
    labels = batch["labels"]
    if not _accepts_logits_to_keep(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, count = token_logprob_sum(logits, labels)
        return LossOutput(loss=loss, count=count)
    # The vocabulary projection dominates memory and a fifth of the compute of small models:
    # run it only at positions that predict a target token (position t predicts label t+1).
    predicts_target = (labels[:, 1:] != IGNORE_INDEX).any(dim=0)
    positions = predicts_target.nonzero().squeeze(1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=positions).logits
    targets = labels[:, positions + 1]
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return LossOutput(loss=loss, count=int((targets != IGNORE_INDEX).sum()))
