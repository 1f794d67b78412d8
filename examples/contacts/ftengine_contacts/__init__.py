"""Generation-based evaluation for the bundled "contacts" task (``--plugin contacts``).

The task (``ftengine_contacts.task``, data in ``examples/contacts``) teaches a model to
answer a message about a person with one line of compact JSON: ``name, age, city, email,
phone, date``. The eval loss says little about that behaviour, so at every evaluation this
plugin generates greedily for the eval rows and scores the answers against the reference
assistant turn: ``schema_valid``, ``exact_match`` and ``field_<key>`` accuracies, logged as
``eval_schema_valid``, ``eval_exact_match``, ..., and ``eval_prompt_tokens`` (mean tokens per
prompt). It supports the ``few_shot`` baseline (``eval.baselines``): the training examples go
before each message as earlier user/assistant turns.

Options, in the ``contacts:`` config section: ``eval_batch_size``, ``max_new_tokens`` and
``eval_limit`` (score only the first N eval rows, to keep evaluation cheap on a CPU).

For ``--plugin grpo`` it gives the reward ``contacts`` (``ftengine_contacts.rewards``): schema
validity plus the share of fields exactly right, by the same scorer.

The package also provides ftengine's default job (``ftengine run`` with no arguments), the file
``default_job.yaml`` (see ``ftengine_contacts.default_job``), whether or not ``contacts`` is
selected.
"""

import json

from ftengine import hookimpl
from ftengine.data import encode_chat_text, render_prompt
from ftengine.modeling import autocast, generate_greedy, stop_token_ids
from pydantic import BaseModel, ConfigDict, Field

from . import task

conflicts = ()
requires = ()


class ContactsOptions(BaseModel):
    """The ``contacts:`` config section."""

    model_config = ConfigDict(extra="forbid")

    eval_batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(96, ge=1)
    eval_limit: int | None = Field(None, ge=1)


def _reference_record(index, row):
    """The record in the assistant answer that ends a chat row."""
    messages = row.get("messages") or []
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError(
            f"contacts: eval row {index} is not a chat row ending with the assistant answer; "
            f"the contacts plugin scores the rows written by examples/contacts/generate.py."
        )
    return json.loads(messages[-1]["content"])


def prompts_of(tokenizer, rows, shots=None):
    """The rendered prompt of each chat row: every message but a final assistant one, after
    the ``shots`` conversations (few-shot prompting) when given."""
    prefix = [message for shot in shots or () for message in shot if message["role"] != "system"]
    prompts = []
    for row in rows:
        messages = row["messages"]
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        system = [m for m in messages if m["role"] == "system"]
        turns = [m for m in messages if m["role"] != "system"]
        prompts.append(render_prompt(tokenizer, system + prefix + turns))
    return prompts


def predict(model, tokenizer, rows, batch_size=16, max_new_tokens=96, shots=None, check_stop=None):
    """Greedy answers of ``model`` to the user turns of chat ``rows``, in row order.

    Every message but a final assistant one is the prompt, after the ``shots`` conversations
    when given (few-shot prompting). Prompts are left padded, so every
    row's answer starts right after its own prompt, and batched by length to pad little.
    Generation stops at the first newline: the answer must be one line, so nothing after a
    newline could make it valid (the newline is kept, so such an answer scores invalid). An
    untrained model that pretty-prints JSON then costs a few tokens instead of all of them.
    ``check_stop`` (``state.check_stop`` in a run) is called before each batch: a stop signal
    then ends the generation without waiting for the other batches.
    """
    prompts = prompts_of(tokenizer, rows, shots)
    stop_ids = stop_token_ids(tokenizer)
    by_length = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [None] * len(prompts)
    for start in range(0, len(by_length), batch_size):
        if check_stop:
            check_stop()
        batch = by_length[start : start + batch_size]
        texts = generate_greedy(
            model,
            tokenizer,
            [prompts[i] for i in batch],
            max_new_tokens,
            eos_token_id=stop_ids,
            stop_strings=["\n"],
        )
        for i, text in zip(batch, texts):
            answers[i] = text
    return answers


@hookimpl
def ftengine_default_job():
    from .default_job import default_job_config

    return default_job_config()


@hookimpl
def ftengine_rewards():
    from .rewards import contact_reward

    return {"contacts": contact_reward}


@hookimpl
def ftengine_headline_metrics():
    return ["exact_match", "schema_valid"]


@hookimpl
def ftengine_config_section(register):
    register("contacts", ContactsOptions)


@hookimpl
def ftengine_eval_metrics(model, tokenizer, datasets, state, shots):
    options = state.config.contacts
    rows = [example["row"] for example in datasets.eval][: options.eval_limit]
    if not rows:
        return {}
    references = [_reference_record(i, row) for i, row in enumerate(rows)]
    with autocast(state):
        predictions = predict(
            model, tokenizer, rows, options.eval_batch_size, options.max_new_tokens, shots, check_stop=state.check_stop
        )
    prompt_tokens = [len(encode_chat_text(tokenizer, prompt)["input_ids"]) for prompt in prompts_of(tokenizer, rows, shots)]
    return task.score(predictions, references) | {"prompt_tokens": sum(prompt_tokens) / len(prompt_tokens)}
