"""Supervised fine-tuning data and loss (default plugin).

Data: any source ``ftengine.data.read_rows`` reads (JSONL, JSON, CSV, Parquet, a directory, a
hub id), in any shape ``row_to_messages`` knows (prompt/response, Alpaca, chat messages,
ShareGPT), renamed by ``data.fields``; the loss covers the response (assistant) tokens only.
With ``train.packing`` the training examples are packed into rows of ``train.max_length`` with
``position_ids`` restarting per example (evaluation rows stay unpacked). The loss is returned
as a sum over target tokens with their count, so the core normalises gradient accumulation by
the total target tokens of the step.
"""

import torch.nn.functional as F
from ftengine import hookimpl
from ftengine.data import IGNORE_INDEX, collate_sft, load_sft_file, load_splits, pack_examples
from ftengine.modeling import target_logits
from ftengine.state import LossOutput

default = True


def load_sft_data(config, tokenizer):
    """The run's ``Datasets``: read, tokenised and validated (cached), packed if asked."""
    packing, max_length = config.train.packing, config.train.max_length
    datasets = load_splits(
        config,
        # A packed run refuses over-long rows instead of cutting them, so it reads them whole.
        lambda path, split: load_sft_file(path, tokenizer, max_length, config.data, truncate=not (packing and split == "train")),
        lambda examples: collate_sft(examples, tokenizer.pad_token_id),
    )
    if packing:
        examples = len(datasets.train)
        datasets.train = pack_examples(datasets.train, max_length, config.data.train)
        tokens = sum(len(row["input_ids"]) for row in datasets.train)
        datasets.stats["train"].update(
            packed_rows=len(datasets.train), examples=examples, fill=round(tokens / (len(datasets.train) * max_length), 4)
        )
    return datasets


@hookimpl(trylast=True)
def ftengine_load_dataset(config, tokenizer):
    return load_sft_data(config, tokenizer)


def token_nll_sum(logits, targets):
    """Summed cross-entropy of ``logits`` against ``targets`` (``IGNORE_INDEX`` skipped), and
    the number of targets it covers."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


@hookimpl(trylast=True)
def ftengine_compute_loss(model, batch, state):
    loss, count = token_nll_sum(*target_logits(model, batch, only_targets=True))
    return LossOutput(loss=loss, count=count)
