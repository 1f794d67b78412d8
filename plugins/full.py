"""Full fine-tuning: every parameter trains; the result is a transformers model directory.

Conflicts with the adapter plugins: there is nothing to adapt when everything trains.
"""

from pathlib import Path

from ftengine import hookimpl

conflicts = ("lora", "dora", "qlora", "prompt_tuning")


@hookimpl
def ftengine_trainable_params(model):
    return [name for name, _ in model.named_parameters()]


@hookimpl
def ftengine_save_model(model, tokenizer, path):
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return sorted(str(p) for p in Path(path).iterdir())
