"""The ``README.md`` model card ``ftengine export`` writes beside the model: what it was made
from (base, method, data), how long it trained and what it scored, from the run's own files."""

import json
from dataclasses import dataclass, field
from pathlib import Path

from ftengine.adapters import read_adapter_config
from ftengine.checkpoint import latest_checkpoint, read_state, sha256_file
from ftengine.data import local_files
from ftengine.errors import DataError


def data_hashes(run_dir, run_config):
    """``{training file: sha256}``: as the run's newest checkpoint recorded it, else hashed now
    (``{}`` when the files are gone or were a hub dataset)."""
    checkpoint = latest_checkpoint(run_dir, healthy_only=False)
    recorded = read_state(checkpoint).get("data_sha256") if checkpoint else None
    if recorded:
        return recorded
    train = (run_config.get("data") or {}).get("train")
    try:
        return {str(f): sha256_file(f) for f in local_files(Path(train))} if train else {}
    except DataError:
        return {}


def final_records(run_dir):
    """``(steps trained, the final evaluation's metrics)`` from ``metrics.jsonl``."""
    steps, final = None, {}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return steps, final
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a killed run
            continue
        if "loss" in record:
            steps = record.get("step", steps)
        elif "baseline" not in record and any(k.startswith("eval_") for k in record):
            final = record
    return steps, final


@dataclass
class ModelCard:
    name: str
    base: str
    format: str
    type_name: str
    method: dict
    data: dict = field(default_factory=dict)
    steps: int | None = None
    metrics: dict = field(default_factory=dict)
    other_types: dict = field(default_factory=dict)

    def note_other_types(self, other_types):
        self.other_types = dict(other_types)

    def render(self):
        method = ", ".join(f"{k} {v}" for k, v in self.method.items() if v not in (None, False, [], {}))
        lines = [
            f"# {self.name}",
            "",
            "Exported by `ftengine export`: the adapter merged into its full-precision base model.",
            "",
            f"- base model: `{self.base}`",
            f"- method: {method}",
            f"- format: {self.format}" + (f", weights {self.type_name}" if self.format == "gguf" else ""),
        ]
        if self.steps is not None:
            lines.append(f"- steps trained: {self.steps}")
        lines += [f"- training data sha256: `{digest}` ({file})" for file, digest in sorted(self.data.items())]
        if self.other_types:
            kept = ", ".join(f"{name} {kind}" for name, kind in sorted(self.other_types.items()))
            lines.append(f"- tensors in another type: {kept} (rows not a multiple of the block size, or the output head)")
        metrics = {k: v for k, v in self.metrics.items() if k.startswith("eval_") and k != "eval_time_s"}
        if metrics:
            lines += ["", f"## Final evaluation (step {self.metrics.get('step')})", "", "| metric | value |", "|---|---:|"]
            lines += [f"| {k.removeprefix('eval_')} | {v:.4g} |" for k, v in metrics.items() if isinstance(v, (int, float))]
        return "\n".join(lines) + "\n"


def model_card(adapter_dir, run_dir, base, format, type_name):
    """The card of the export of ``adapter_dir`` (and of its run, when ``run_dir`` is one)."""
    adapter = read_adapter_config(adapter_dir)
    method = {
        "peft_type": adapter.get("peft_type"),
        "r": adapter.get("r"),
        "lora_alpha": adapter.get("lora_alpha"),
        "use_rslora": adapter.get("use_rslora"),
        "use_dora": adapter.get("use_dora"),
        "target_modules": adapter.get("target_modules"),
    }
    name = run_dir.name if run_dir is not None else Path(adapter_dir).resolve().name
    card = ModelCard(name=name, base=base, format=format, type_name=type_name, method=method)
    if run_dir is not None:
        run_config = json.loads((run_dir / "config.json").read_text())
        card.method["plugins"] = run_config.get("plugins")
        card.data = data_hashes(run_dir, run_config)
        card.steps, card.metrics = final_records(run_dir)
    return card
