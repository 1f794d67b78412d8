"""The contacts reward for ``--plugin grpo``: schema validity plus the share of fields right,
by the evaluation's scorer; a short GRPO run on the task's own chat rows uses it."""

import json
from pathlib import Path

import pytest
from ftengine.build import configure
from ftengine.loop import train
from ftengine.testing import write_jsonl
from ftengine_contacts import task
from ftengine_contacts.rewards import contact_reward

DATA = Path(__file__).resolve().parents[1] / "data" / "valid.jsonl"


def rows(n):
    return [json.loads(line) for line in DATA.read_text().splitlines()[:n]]


def test_the_reward_is_schema_validity_plus_the_share_of_fields_right():
    (row,) = rows(1)
    reference = json.loads(row["messages"][-1]["content"])
    exact = task.compact(reference)
    one_wrong = task.compact({**reference, "age": (reference["age"] or 0) + 1})
    reordered = json.dumps(dict(reversed(list(reference.items()))))
    completions = [exact, one_wrong, reordered, "not json", exact + "\n"]
    assert contact_reward([""] * 5, completions, [row] * 5) == pytest.approx([2.0, 1 + 5 / 6, 1.0, 0.0, 1.0])


def test_a_row_without_a_reference_answer_is_named():
    with pytest.raises(ValueError, match="eval row 0 is not a chat row ending with the assistant answer"):
        contact_reward([""], ["{}"], [{"messages": [{"role": "user", "content": "x"}]}])


def test_grpo_trains_on_the_task_rows_with_the_contacts_reward(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", rows(2))
    overrides = [
        f"model={tiny_model_dir}",
        f"data.train={data}",
        f"output_dir={tmp_path / 'out'}",
        "train.max_steps=1",
        "train.batch_size=2",
        "grpo.num_generations=2",
        "grpo.max_completion_length=4",
    ]
    train(*configure(None, ["lora", "grpo", "contacts"], overrides))
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert record["rewards_contacts_mean"] == 0.0  # a random tiny model writes no JSON in 4 tokens
