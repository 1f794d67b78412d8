"""Test helpers for ftengine and for plugin authors (also a pytest plugin: ``tiny_model_dir``).

Everything here is built in-process and offline: a byte-level BPE tokenizer with a chat
template, and a randomly initialised Llama-architecture model a few hundred KB in size, with a
fixed seed so every test sees the same weights.
"""

import json
from pathlib import Path

import pytest

from . import hookimpl

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer():
    """A byte-level BPE tokenizer (256 byte tokens + 3 specials) with a ChatML template."""
    return _byte_level_tokenizer(merges=[], split_words=False)


def bpe_tokenizer():
    """A byte-level BPE tokenizer with a few merges (llama.cpp needs some) and a ChatML template:
    ``tiny_tokenizer`` with GPT-2's split regex and merges, for tests of GGUF exports."""
    merges = [("a", "l"), ("e", "r"), ("Ġ", "a"), ("t", "h"), ("th", "e"), ("i", "n"), ("o", "n")]
    return _byte_level_tokenizer(merges, split_words=True)


def _byte_level_tokenizer(merges, split_words):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in [a + b for a, b in merges] + SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_words)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_base(path, model_type, tie=False, seed=0):
    """A random-init tiny model of ``model_type`` (weights ~N(0, 0.2), as ``tiny_model``'s) with
    ``bpe_tokenizer``, saved to ``path``; 288 embedding rows, some unused (as real vocabularies pad)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = bpe_tokenizer()
    config = AutoConfig.for_model(
        model_type,
        vocab_size=288,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model.eval()


def tiny_model(seed=0, vocab_size=259, hidden_size=32, layers=2, tie_word_embeddings=False):
    """A random-init Llama causal LM (fp32, eval mode) that is the same for the same seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=257,
        eos_token_id=258,
        pad_token_id=256,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Default init gives near-uniform logits; a larger scale makes adapter effects visible.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return model.eval()


def save_tiny_model(path, seed=0, **kwargs):
    """Write a tiny model and tokenizer as a transformers directory; return the path."""
    path = Path(path)
    tiny_model(seed=seed, **kwargs).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_jsonl(path, rows):
    """Write ``rows`` (dicts) as JSONL; return the path."""
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_rows(n=16, seed=0):
    """Small prompt/response rows with a learnable pattern (answer = reversed word)."""
    import random

    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    rows = []
    for _ in range(n):
        word = rng.choice(words)
        rows.append({"prompt": f"Reverse: {word}", "response": word[::-1]})
    return rows


def greedy_without_cache(model, input_ids, max_new_tokens):
    """Greedy continuation of each row of ``input_ids`` (no padding), by full forward passes
    without a KV cache: the argmax of the last position, one token at a time.

    A reference that no library's cache or position handling can change: compare a model's
    cached ``generate`` with it rather than with another library's ``generate``.
    """
    import torch

    rows = []
    with torch.no_grad():
        for row in input_ids:
            sequence = row.unsqueeze(0)
            for _ in range(max_new_tokens):
                next_token = model(input_ids=sequence).logits[:, -1].argmax(-1, keepdim=True)
                sequence = torch.cat([sequence, next_token], dim=1)
            rows.append(sequence[0])
    return torch.stack(rows)


class LogitsOnly:
    """``LogitsOnly(model)`` calls ``model`` through a forward that takes no ``logits_to_keep``,
    as some models' do: for testing the path that computes every position's logits."""

    def __init__(self, model):
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    __call__ = forward


class KillAfter:
    """A plugin that interrupts training after step ``step``, as if the process were killed:
    ``pm.register(KillAfter(3))``, then ``pytest.raises(KeyboardInterrupt)`` around ``train``."""

    def __init__(self, step):
        self.step = step

    @hookimpl
    def ftengine_on_step_end(self, state):
        if state.step == self.step:
            raise KeyboardInterrupt(f"killed after step {self.step}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A transformers directory holding the tiny model and tokenizer (built once per session)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def tiny_data(tmp_path):
    """``(train.jsonl, eval.jsonl)`` paths of small prompt/response data."""
    return (
        write_jsonl(tmp_path / "train.jsonl", sft_rows(16, seed=0)),
        write_jsonl(tmp_path / "eval.jsonl", sft_rows(4, seed=1)),
    )
