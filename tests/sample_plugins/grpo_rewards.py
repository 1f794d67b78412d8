"""Reward functions for the grpo tests: a reward the tiny model can learn, and one that
misbehaves on the rows that ask it to (``"fail": "raise" | "nan" | "count"``)."""

from ftengine import hookimpl


def short(prompts, completions, rows):
    """Shorter completions score higher."""
    return [-float(len(c)) for c in completions]


def picky(prompts, completions, rows):
    """1 for a completion holding the row's ``letter``, else 0; misbehaves as the row says."""
    failing = [row.get("fail") for row in rows]
    if "raise" in failing:
        raise ValueError("this row asks me to fail")
    if "count" in failing:
        return [0.0] * (len(completions) - 1)
    return [float("nan") if row.get("fail") == "nan" else float(row.get("letter", "a") in c) for c, row in zip(completions, rows)]


@hookimpl
def ftengine_rewards(config):
    return {"short": short, "picky": picky}
