"""Reading JSONL rows, rendering chats, masking everything but the response, batching.

Masking renders the conversation prefix by prefix with the tokenizer's chat template and
labels exactly the characters each assistant turn adds (its content and end-of-turn marker),
then maps characters to tokens through the tokenizer's offsets. A template that does not
render prefixes consistently (some templates rewrite earlier turns) is an error naming the row,
never a silently wrong mask.
"""

import json
from pathlib import Path

import torch

from .errors import DataError
from .state import Datasets

IGNORE_INDEX = -100


def read_jsonl(path):
    """Yield ``(row, "file:line")`` for each non-blank line of a JSONL file.

    :raises DataError: for a missing or empty file, malformed JSON or a non-object line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found (check data.train / data.eval)")
    count = 0
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: each line must be a JSON object, got {type(row).__name__}")
            count += 1
            yield row, where
    if count == 0:
        raise DataError(f"{path}: the file holds no rows (expected one JSON object per line)")


def require_str(row, field, where, allow_empty=False):
    """Return ``row[field]`` if it is a (non-empty) string; else raise naming the field."""
    if field not in row:
        raise DataError(f"{where}: missing field '{field}'")
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field '{field}' is empty")
    return value


def require_messages(value, field, where):
    """Check a chat message list: ``[{"role": str, "content": str}, ...]``."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise DataError(f"{where}: {field}[{i}] must be an object with a string 'role'")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: {field}[{i}].content must be a string")
    return value


def row_to_messages(row, where):
    """A ``{"prompt", "response"}`` or ``{"messages"}`` row as a list of chat messages."""
    if "messages" in row:
        messages = require_messages(row["messages"], "messages", where)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: 'messages' has no assistant turn to learn from")
        return messages
    if "prompt" in row or "response" in row:
        prompt = require_str(row, "prompt", where, allow_empty=True)
        response = require_str(row, "response", where)
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    raise DataError(f"{where}: expected a 'messages' list or 'prompt' and 'response' fields; got keys {sorted(row)}")


def render_chat(tokenizer, messages, where):
    """Render ``messages`` and return ``(text, spans)``: char spans of each assistant turn.

    Without a chat template, turns are concatenated as plain text and each assistant turn ends
    with the EOS token.
    """
    if not tokenizer.chat_template:
        text, spans = "", []
        for message in messages:
            start = len(text)
            text += message["content"]
            if message["role"] == "assistant":
                text += tokenizer.eos_token or ""
                spans.append((start, len(text)))
        return text, spans

    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not upto.startswith(before):
            raise DataError(
                f"{where}: the chat template does not render turn {i} as an extension of the "
                f"turns before it, so the response tokens cannot be located; use a template "
                f"that renders prefixes consistently"
            )
        spans.append((len(before), len(upto)))
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if spans and not text.startswith(text[: spans[-1][1]]):
        raise DataError(f"{where}: the chat template renders the whole chat differently from its prefixes")
    return text, spans


def tokenize_with_mask(tokenizer, text, spans):
    """Token ids of ``text`` and labels that keep only tokens starting inside ``spans``."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for index, (start, end) in enumerate(encoding["offset_mapping"]):
        if end > start and any(s <= start < e for s, e in spans):
            labels[index] = ids[index]
    return ids, labels


def pad_batch(sequences, pad_value):
    """Right-pad lists of ints into a ``[batch, longest]`` long tensor."""
    longest = max(len(s) for s in sequences)
    return torch.tensor([list(s) + [pad_value] * (longest - len(s)) for s in sequences], dtype=torch.long)


def collate_sft(examples, pad_token_id):
    """Pad SFT examples into ``input_ids``, ``attention_mask`` and ``labels``."""
    ids = [e["input_ids"] for e in examples]
    return {
        "input_ids": pad_batch(ids, pad_token_id),
        "attention_mask": pad_batch([[1] * len(s) for s in ids], 0),
        "labels": pad_batch([e["labels"] for e in examples], IGNORE_INDEX),
    }


class Truncation:
    """Cuts the examples of one file to ``max_length`` tokens and counts what it cut.

    An example is one or more ``(ids, labels)`` sequences (one for SFT; chosen and rejected for
    DPO). Sequences keep their start; an example is dropped when a sequence loses every labelled
    token. ``stats`` gives the counts a loader reports (and the progress plugin prints).
    """

    def __init__(self, max_length):
        self.max_length, self.truncated, self.dropped = max_length, 0, 0

    def cut(self, sequences):
        """``sequences`` cut to ``max_length``, or ``None`` if the example is to be dropped."""
        if all(len(ids) <= self.max_length for ids, _ in sequences):
            return sequences
        self.truncated += 1
        cut = [(ids[: self.max_length], labels[: self.max_length]) for ids, labels in sequences]
        if any(all(label == IGNORE_INDEX for label in labels) for _, labels in cut):
            self.dropped += 1
            return None
        return cut

    def stats(self, kept):
        """``{"rows", "truncated", "dropped"}`` for a file of which ``kept`` examples were kept."""
        return {"rows": kept + self.dropped, "truncated": self.truncated, "dropped": self.dropped}


def load_sft_file(path, tokenizer, max_length):
    """Tokenise an SFT JSONL file; return ``(examples, stats)``.

    Sequences longer than ``max_length`` are truncated and counted; a row whose response
    tokens are all cut off is dropped and counted. Both counts are reported by the caller.
    """
    examples, truncation = [], Truncation(max_length)
    for row, where in read_jsonl(path):
        messages = row_to_messages(row, where)
        text, spans = render_chat(tokenizer, messages, where)
        ids, labels = tokenize_with_mask(tokenizer, text, spans)
        if all(label == IGNORE_INDEX for label in labels):
            raise DataError(f"{where}: the response is empty after tokenisation")
        sequences = truncation.cut([(ids, labels)])
        if sequences is None:
            continue
        ((ids, labels),) = sequences
        examples.append({"input_ids": ids, "labels": labels, "row": row, "source": where})
    return examples, truncation.stats(kept=len(examples))


def load_splits(config, read_file, collate):
    """``Datasets`` from ``data.train`` and the optional ``data.eval``.

    :param read_file: ``read_file(path, split) -> (examples, stats)`` for one JSONL file.
    :param collate: pads a list of examples into a batch.
    """
    train, stats = read_file(config.data.train, "train")
    eval_examples, eval_stats = read_file(config.data.eval, "eval") if config.data.eval else ([], {})
    return Datasets(train=train, eval=eval_examples, collate=collate, stats={"train": stats, "eval": eval_stats})
