"""The contacts task's reward for ``--plugin grpo`` (reward name ``contacts``): schema validity
plus the share of fields exactly right, scored by the evaluation's own scorer
(``task.score``), so a completion earns what the evaluation would credit it with.

A completion scores from 0 (not a JSON object) to 2 (schema-valid, every field right). The
rows are the task's chat rows: the assistant turn that ends each is the reference record (the
``grpo`` plugin prompts with the turns before it).
"""

from . import task


def contact_reward(prompts, completions, rows):
    """``schema_valid + (fields right) / 6`` of each completion against its row's reference."""
    from . import _reference_record

    rewards = []
    for index, (completion, row) in enumerate(zip(completions, rows)):
        scores = task.score([completion], [_reference_record(index, row)])
        rewards.append(scores["schema_valid"] + sum(scores[f"field_{key}"] for key in task.KEYS) / len(task.KEYS))
    return rewards
