"""Helpers for running and editing a model, shared by the core and the plugins.

    from ftengine.modeling import autocast, eval_mode, target_logits

    with eval_mode(model), autocast(state), torch.no_grad():
        logits, targets = target_logits(model, batch)   # only where a label is predicted

One copy of each: the loop, the losses (``sft``, ``dpo``), generation-based evaluation
(``contacts``) and inference use these rather than their own versions, so a fix (a model whose
forward takes no ``logits_to_keep``, a tokenizer's padding side) lands everywhere at once.
"""

import collections
import inspect
from contextlib import contextmanager, nullcontext

import torch

from .data import IGNORE_INDEX, encode_chat_text


def autocast_dtype_for(precision, device):
    """The dtype a run autocasts to under ``train.precision`` on ``device``, or ``None`` to
    compute in the weights' dtype. ``auto`` keeps CPU runs in fp32 (exact, the same on every CPU)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def cpu_computes_bf16():
    """Whether this CPU has bfloat16 arithmetic (AVX512-BF16 or AMX), where bf16 autocast is
    faster than fp32; elsewhere it is emulated, and slower."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def store_frozen_weights_in(model, dtype):
    """Keep the frozen weights and biases of ``model``'s ``nn.Linear`` layers in ``dtype``, the
    autocast dtype (nothing when ``None``).

    Autocast casts a frozen fp32 weight anew at every forward (its cast cache keeps trainable
    leaves only): a sixth of a bf16 LoRA step on a CPU, and every decoding step of an
    evaluation. The products do not change, since autocast rounds the weight the same way.
    Tensors shared with another module (an output head tied to the embedding, which is not
    autocast) and anything trained stay as they are.
    """
    if dtype is None:
        return
    names = collections.Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        for tensor in (module.weight, module.bias):
            if tensor is not None and tensor.dtype == torch.float32 and not tensor.requires_grad and names[id(tensor)] == 1:
                tensor.data = tensor.data.to(dtype)


def autocast(state):
    """The run's mixed-precision context: ``torch.autocast`` to ``state.autocast_dtype`` on
    ``state.device``, or a no-op when the run computes in the weights' dtype (``None``)."""
    if state.autocast_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=state.device.type, dtype=state.autocast_dtype)


@contextmanager
def eval_mode(model):
    """Put ``model`` in eval mode (dropout off) for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def inner_model(model):
    """The model a parallel wrapper (``Parallel.model``) wraps, which it exposes as ``.module``
    as torch's wrappers do; ``model`` itself when it is no such wrapper."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def accepts_logits_to_keep(model):
    """Whether ``model.forward`` takes ``logits_to_keep`` (transformers causal LMs do); through
    a parallel wrapper, whether the wrapped model's does."""
    return "logits_to_keep" in inspect.signature(inner_model(model).forward).parameters


def target_logits(model, batch, only_targets=False):
    """``(logits, targets)`` of a forward pass over ``batch`` (``input_ids``, ``attention_mask``,
    ``labels``, and ``position_ids`` for packed rows), where ``logits[:, j]`` predicts ``targets[:, j]``.

    Position t predicts label t+1. The vocabulary projection dominates memory and a fifth of
    the compute of small models, so where the model takes ``logits_to_keep`` it runs only at
    the positions that predict a labelled token in some row; other positions of ``targets``
    are ``IGNORE_INDEX`` as in ``labels``. Otherwise all logits are computed and shifted.

    ``only_targets=True`` (a loss that sums over tokens, like SFT's): the projection runs on the
    labelled positions of each row alone, and they come back as one row, ``[1, targets, vocab]``
    in row order, with no ``IGNORE_INDEX`` left. Rows whose answers sit at different positions
    (packed rows, padded batches) would otherwise project every position labelled in any row.
    """
    labels = batch["labels"]
    if "position_ids" in batch:
        # Packed rows: with neither an attention mask nor a KV cache, transformers confines
        # attention to the runs of consecutive position_ids (one per example; padding is a run
        # of its own): masking_utils.find_packed_sequence_indices.
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    else:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if not accepts_logits_to_keep(model):
        logits, targets = model(**inputs).logits[:, :-1], labels[:, 1:]
        if only_targets:
            keep = targets != IGNORE_INDEX
            return logits[keep].unsqueeze(0), targets[keep].unsqueeze(0)
        return logits, targets
    positions = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    targets = labels[:, positions + 1]
    head = output_head(inner_model(model))
    if not only_targets or head is None:
        return model(**inputs, logits_to_keep=positions).logits, targets
    keep = targets != IGNORE_INDEX

    def project_targets_only(module, args):
        # The head's input is the hidden states at ``positions``, [rows, positions, hidden].
        if args and torch.is_tensor(args[0]) and args[0].shape[:2] == keep.shape:
            return (args[0][keep].unsqueeze(0), *args[1:])
        return None

    handle = head.register_forward_pre_hook(project_targets_only)
    try:
        logits = model(**inputs, logits_to_keep=positions).logits
    finally:
        handle.remove()
    if logits.shape[:2] == keep.shape:  # a model that called its head some other way
        return logits[keep].unsqueeze(0), targets[keep].unsqueeze(0)
    return logits, targets[keep].unsqueeze(0)


@torch.no_grad()
def generate_greedy(model, tokenizer, texts, max_new_tokens, add_special_tokens=False, stop_strings=(), **generate_options):
    """Greedy continuations of ``texts``, generated as one left-padded batch and decoded
    without special tokens.

    Left padding makes every row continue right after its own text; the tokenizer's own
    ``padding_side`` (right, for training) is left as it is. ``add_special_tokens``: ``False``
    for text rendered by a chat template, which holds them already (a ``ChatText`` from
    ``render_prompt`` keeps special-token text typed in a message as text). Generation stops at the
    end-of-sequence token, or at the first of ``stop_strings`` (kept in the output). Other
    ``generate_options`` go to ``model.generate`` (``eos_token_id`` ...). Dropout is off meanwhile.
    """
    if stop_strings:
        generate_options.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
    encoded = [encode_chat_text(tokenizer, text, add_special_tokens)["input_ids"] for text in texts]
    batch = tokenizer.pad({"input_ids": encoded}, padding_side="left", return_tensors="pt").to(next(model.parameters()).device)
    with eval_mode(model):
        output = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            **generate_options,
        )
    return tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def stop_token_ids(tokenizer):
    """The token ids that end an answer: eos, plus the token that closes an assistant turn in the
    chat template when it differs (a base model's eos is often ``<|endoftext|>`` while its
    template ends turns with ``<|im_end|>``, which is what fine-tuning teaches it to emit)."""
    stop_ids = [tokenizer.eos_token_id]
    if not tokenizer.chat_template:
        return stop_ids
    sentinel = "\x00answer\x00"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": sentinel}], tokenize=False
    )
    after_answer = tokenizer(rendered.split(sentinel, 1)[1], add_special_tokens=False)["input_ids"]
    if after_answer and after_answer[0] in tokenizer.all_special_ids and after_answer[0] not in stop_ids:
        stop_ids.append(after_answer[0])
    return stop_ids


def output_head(model):
    """The model's output (vocabulary) projection, or ``None`` for a model without one."""
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def replace_module(model, path, module):
    """Put ``module`` at the dotted ``path`` of ``model`` (``model.layers.0.mlp.up_proj``) in
    place of the submodule there; return the one replaced."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    replaced = getattr(parent, child)
    setattr(parent, child, module)
    return replaced


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
