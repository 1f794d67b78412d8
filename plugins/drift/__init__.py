"""The forgetting check (``--plugin drift``): how far fine-tuning moved the model away from its
base model on everyday requests that have nothing to do with the task.

    ftengine run job.yaml --plugin lora --plugin drift -o drift.warn_kl=0.1

At every evaluation it adds, logged as ``eval_drift_*``:

* ``drift_kl``: the mean per-token KL divergence KL(base || tuned) over the base model's own
  greedy answers to a set of general prompts. Each prompt and its base answer are rendered with
  the chat template; at every answer token (the end-of-turn marker included) the KL is taken
  over the whole vocabulary, and the mean weighs every answer token the same. 0 means the
  fine-tuned model answers general requests exactly as the base does.
* ``drift_ppl``: the perplexity of the fine-tuned model on a short general text, in chunks of
  ``train.max_length`` tokens; ``drift_ppl_base``: the base model's, computed once.

When ``drift_kl`` is above ``drift.warn_kl`` a ``DriftWarning`` names the value and the
threshold (on the main process only).

The base model is never a second copy:

* with adapters (lora, dora, qlora, prompt_tuning) it is the same model with its adapters off
  (``activate(None)`` on the adapter methods), at every evaluation;
* when the run trains the model's own weights (``full``: ``RunState.adapter_name`` is ``None``)
  the base answers, their log-probabilities over the whole vocabulary and the base perplexity
  are computed once, before the first step (``ftengine_on_train_start``, or the first
  evaluation when there is no training), and kept in memory: answer tokens x vocabulary,
  float32 up to ``CACHE_FLOAT32_BYTES`` and float16 beyond (SmolLM2-135M: about 800 tokens x
  49,152 = 160 MB). A run resumed past step 0 no longer has its base: it reports
  ``drift_ppl`` only, and says so once.

The general set ships with the package (no download at run time) and was written by hand
for ftengine, not copied from anywhere: ``general_prompts.jsonl`` holds 24 everyday requests
(explain, list, rewrite, short sums, advice, trivia) as chat rows
``{"messages": [{"role": "user", "content": "..."}]}``, and ``general_text.txt`` about 740
words of plain prose. ``drift.prompts`` and ``drift.text`` replace them with your own files.
"""

import json
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from ftengine import hookimpl
from ftengine.config import Section
from ftengine.data import IGNORE_INDEX, pad_batch, render_chat, render_prompt, require_messages, tokenize_with_mask
from ftengine.errors import DataError
from ftengine.loop import to_device
from ftengine.methods import adapter_methods
from ftengine.modeling import autocast, eval_mode, generate_greedy, stop_token_ids, target_logits
from pydantic import Field, NonNegativeFloat, PositiveInt

conflicts = ()
requires = ()

BUNDLED_PROMPTS = "general_prompts.jsonl"
BUNDLED_TEXT = "general_text.txt"
PROMPT_FORMAT = '{"messages": [{"role": "user", "content": "..."}]}'
#: The cached base log-probs of a ``full`` run are kept in float32 up to this size, in float16 beyond.
CACHE_FLOAT32_BYTES = 512 * 2**20


class DriftWarning(UserWarning):
    """The fine-tuned model moved far from its base model on general prompts."""


class DriftOptions(Section):
    """The ``drift:`` config section."""

    prompts: str | None = Field(
        None, description=f"JSONL of chat prompts, one per line ({PROMPT_FORMAT}); default: the bundled set"
    )
    text: str | None = Field(None, description="a plain-text file for the perplexity; default: the bundled text")
    max_new_tokens: PositiveInt = Field(32, description="length of the base model's answers (tokens)")
    # Calibrated on the default job: 0.165 at its learning rate, 0.99 at four times it (docs/evaluation.md).
    warn_kl: NonNegativeFloat = Field(0.5, description="warn when eval_drift_kl is above this")
    batch_size: PositiveInt = Field(8, description="prompts (or text chunks) per forward pass")


# --------------------------------------------------------------------------------------------
# the general set
# --------------------------------------------------------------------------------------------


def source(path, bundled):
    """The file ``path`` names, or the bundled file ``bundled`` (a ``Traversable``) when ``None``."""
    return Path(path) if path is not None else resources.files(__name__).joinpath(bundled)


def _read(file, option):
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise DataError(f"{file}: cannot read {option} ({reason}); point {option} at an existing UTF-8 file") from None


def read_prompts(options):
    """The prompts of ``drift.prompts`` (or the bundled set): a list of message lists, each
    ending with the user turn the model answers.

    :raises DataError: naming ``file:line`` for a row that is not a chat ending with a user
        turn, or the file when it is missing or holds no prompt.
    """
    file = source(options.prompts, BUNDLED_PROMPTS)
    prompts = []
    for number, line in enumerate(_read(file, "drift.prompts").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{file}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg}); each line is one prompt, {PROMPT_FORMAT}") from None
        if not isinstance(row, dict) or row.get("messages") is None:
            raise DataError(f"{where}: expected a chat row {PROMPT_FORMAT}")
        messages = require_messages(row["messages"], "messages", where)
        if messages[-1]["role"] != "user":
            raise DataError(
                f"{where}: the chat ends with a '{messages[-1]['role']}' turn; it must end with the user turn the model "
                f"answers (the base model writes the answer)"
            )
        prompts.append(messages)
    if not prompts:
        raise DataError(f"{file}: holds no prompts; write one chat per line, {PROMPT_FORMAT}")
    return prompts


def read_text(options):
    """The text of ``drift.text`` (or the bundled one). :raises DataError: when it is empty."""
    file = source(options.text, BUNDLED_TEXT)
    text = _read(file, "drift.text")
    if not text.strip():
        raise DataError(f"{file}: holds no text; drift.text needs some plain prose to measure perplexity on")
    return text


# --------------------------------------------------------------------------------------------
# batches and log-probabilities
# --------------------------------------------------------------------------------------------


def prompt_text(tokenizer, messages):
    """What the model continues to answer ``messages``: the chat template with the generation
    prompt, or the turns' text concatenated when the tokenizer has no template (as ``render_chat``)."""
    if not tokenizer.chat_template:
        return "".join(m["content"] for m in messages)
    return render_prompt(tokenizer, messages)


def greedy_answers(model, tokenizer, prompts, options):
    """The model's greedy answers to ``prompts``, in order (batched by length, to pad little)."""
    texts = [prompt_text(tokenizer, messages) for messages in prompts]
    stop = stop_token_ids(tokenizer)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    answers = [None] * len(texts)
    for start in range(0, len(order), options.batch_size):
        batch = order[start : start + options.batch_size]
        outputs = generate_greedy(model, tokenizer, [texts[i] for i in batch], options.max_new_tokens, eos_token_id=stop)
        for i, answer in zip(batch, outputs):
            answers[i] = answer
    return answers


def collate(rows, pad_token_id):
    ids = [r[0] for r in rows]
    return {
        "input_ids": pad_batch(ids, pad_token_id),
        "attention_mask": pad_batch([[1] * len(s) for s in ids], 0),
        "labels": pad_batch([r[1] for r in rows], IGNORE_INDEX),
    }


def answer_batches(tokenizer, prompts, answers, batch_size):
    """Batches of prompt + answer, labelled on the answer turn only (its end-of-turn included)."""
    rows = []
    for index, (messages, answer) in enumerate(zip(prompts, answers)):
        text, spans = render_chat(tokenizer, [*messages, {"role": "assistant", "content": answer}], f"drift prompt {index}")
        rows.append(tokenize_with_mask(tokenizer, text, spans[-1:]))
    return [collate(rows[i : i + batch_size], tokenizer.pad_token_id) for i in range(0, len(rows), batch_size)]


def text_batches(tokenizer, text, chunk_length, batch_size):
    """The text's tokens in chunks of ``chunk_length``, every token but a chunk's first predicted."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks = [ids[i : i + chunk_length] for i in range(0, len(ids), chunk_length)]
    rows = [(chunk, chunk) for chunk in chunks if len(chunk) > 1]
    return [collate(rows[i : i + batch_size], tokenizer.pad_token_id) for i in range(0, len(rows), batch_size)]


def answer_logprobs(model, batch):
    """``[answer tokens, vocabulary]`` float32 log-probabilities at every labelled position of
    ``batch``, rows in order."""
    logits, targets = target_logits(model, batch)
    return logits[targets != IGNORE_INDEX].float().log_softmax(dim=-1)


def kl_sum(base, tuned):
    """Sum over positions of KL(base || tuned) from log-probabilities ``[positions, vocabulary]``;
    a token the base gives probability 0 adds nothing."""
    p = base.exp()
    return float(torch.where(p > 0, p * (base - tuned), torch.zeros_like(p)).sum())


@torch.no_grad()
def perplexity(model, batches, device):
    """exp of the mean next-token negative log-likelihood over every labelled token."""
    nll, count = 0.0, 0
    for batch in batches:
        logits, targets = target_logits(model, to_device(batch, device))
        nll += float(F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((targets != IGNORE_INDEX).sum())
    return math.exp(nll / max(count, 1))


# --------------------------------------------------------------------------------------------
# the base model
# --------------------------------------------------------------------------------------------


@contextmanager
def base_model(model, state):
    """The block runs ``model`` as the base: its adapters off, then back to the trained one.
    A run without an adapter (``full``) switches nothing."""
    if state.adapter_name is None:
        yield model
        return
    methods = adapter_methods(state.pm)
    methods.activate(model, None)
    try:
        yield model
    finally:
        methods.activate(model, state.adapter_name)


@dataclass
class Drift:
    """What the check keeps for a run, in ``state.plugin_data["drift"]``."""

    text_batches: list
    answers: list | None = None  # the base model's greedy answers, in prompt order
    batches: list | None = None  # prompt + base answer, tokenised (on the CPU)
    answer_tokens: int = 0
    ppl_base: float | None = None
    #: ``full`` only: per batch, the base log-probs ``[answer tokens, vocabulary]`` (CPU).
    base_logprobs: list | None = None
    cache_bytes: int = 0

    @property
    def base_known(self):
        return self.batches is not None


def cached_logprobs(model, batches, device):
    """The base log-probs of every batch, on the CPU: float32, or float16 when the whole cache
    would pass ``CACHE_FLOAT32_BYTES``."""
    cache, dtype = [], None
    tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    for batch in batches:
        logprobs = answer_logprobs(model, to_device(batch, device))
        if dtype is None:
            dtype = torch.float32 if tokens * logprobs.shape[-1] * 4 <= CACHE_FLOAT32_BYTES else torch.float16
        cache.append(logprobs.to("cpu", dtype))
    return cache


@torch.no_grad()
def prepare(model, tokenizer, state):
    """The run's ``Drift``, made at the first call: read the general set, then, with the base
    model, its answers, its perplexity and (``full``) its log-probs."""
    drift = state.plugin_data.get("drift")
    if drift is not None:
        return drift
    options, config = state.config.drift, state.config
    prompts, text = read_prompts(options), read_text(options)
    drift = Drift(text_batches=text_batches(tokenizer, text, config.train.max_length, options.batch_size))
    full = state.adapter_name is None
    if full and state.step > 0:
        if state.world.is_main:
            warnings.warn(
                DriftWarning(
                    f"drift: the run trains the model's own weights and starts at step {state.step}, so the base model "
                    f"is gone (it is kept from step 0 only): eval_drift_kl and eval_drift_ppl_base are not reported"
                ),
                stacklevel=2,
            )
    else:
        with base_model(model, state), eval_mode(model), autocast(state):
            drift.answers = greedy_answers(model, tokenizer, prompts, options)
            drift.batches = answer_batches(tokenizer, prompts, drift.answers, options.batch_size)
            drift.ppl_base = perplexity(model, drift.text_batches, state.device)
            if full:
                drift.base_logprobs = cached_logprobs(model, drift.batches, state.device)
                drift.cache_bytes = sum(t.numel() * t.element_size() for t in drift.base_logprobs)
        drift.answer_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in drift.batches)
    state.plugin_data["drift"] = drift
    return drift


@torch.no_grad()
def mean_kl(model, drift, state):
    """Mean per-token KL(base || tuned) over the base answers."""
    total = 0.0
    for index, cpu_batch in enumerate(drift.batches):
        batch = to_device(cpu_batch, state.device)
        tuned = answer_logprobs(model, batch)
        if drift.base_logprobs is not None:
            base = drift.base_logprobs[index].to(state.device, torch.float32)
        else:
            with base_model(model, state):
                base = answer_logprobs(model, batch)
        total += kl_sum(base, tuned)
    return total / max(drift.answer_tokens, 1)


# --------------------------------------------------------------------------------------------
# hooks
# --------------------------------------------------------------------------------------------


@hookimpl
def ftengine_config_section(register):
    register("drift", DriftOptions)


@hookimpl
def ftengine_validate(config):
    problems = []
    for option, read in (("drift.prompts", read_prompts), ("drift.text", read_text)):
        try:
            read(config.drift)
        except DataError as exc:
            problems.append(f"{option}: {exc}")
    return problems


@hookimpl
def ftengine_on_train_start(model, tokenizer, state):
    # Before the first step the model is still the base: a full fine-tuning run keeps it now.
    prepare(model, tokenizer, state)


@hookimpl
def ftengine_eval_metrics(model, tokenizer, datasets, state):
    if datasets.eval_name is not None:  # the drift does not depend on the eval set: once per evaluation
        return None
    drift = prepare(model, tokenizer, state)
    with autocast(state):
        metrics = {"drift_ppl": perplexity(model, drift.text_batches, state.device)}
        if drift.base_known:
            metrics["drift_kl"] = mean_kl(model, drift, state)
            metrics["drift_ppl_base"] = drift.ppl_base
    warn_kl = state.config.drift.warn_kl
    if state.world.is_main and metrics.get("drift_kl", 0.0) > warn_kl:
        warnings.warn(
            DriftWarning(
                f"eval_drift_kl={metrics['drift_kl']:.4g} at step {state.step} is above drift.warn_kl={warn_kl:g}: the model's "
                f"answers to general prompts moved far from the base model's (forgetting); lower train.lr or the number of steps"
            ),
            stacklevel=2,
        )
    return metrics
