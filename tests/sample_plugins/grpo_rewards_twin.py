"""A second plugin giving a reward named 'short', to clash with grpo_rewards."""

from ftengine import hookimpl


@hookimpl
def ftengine_rewards():
    return {"short": lambda prompts, completions, rows: [0.0] * len(completions)}
