"""``ftengine export``: a trained adapter merged into its base, as one GGUF file (llama.cpp,
Ollama, LM Studio) or as a transformers directory with a model card.

    ftengine export runs/contacts --format gguf --type q8_0 --out exported/
    ftengine export runs/contacts/final --format safetensors --out merged/

The adapter is merged through its method (``AdapterMethods.merge``: a method that cannot merge
is refused, naming it) into the *full-precision* base: for a QLoRA run the base is loaded
without quantisation, so the update lands on the original weights and not on their 4-bit
round trip (``ftengine.inference.merged_model(full_precision=True)``). Everything that can be
checked before the base loads is: the source, ``--out``, the base's architecture. The output
directory is written whole or not at all (``ftengine.checkpoint.atomic_directory``).
"""

import json
from pathlib import Path

import click
from ftengine import hookimpl
from ftengine.adapters import read_adapter_config
from ftengine.checkpoint import atomic_directory, atomic_write_text, storage_error
from ftengine.inference import check_merge_target, merged_model, strict_option

from .gguf_model import TYPES, ExportError, gguf_architecture, write_gguf
from .model_card import model_card

ftengine_plugin_api = 1

FORMATS = ("gguf", "safetensors")


def gguf_file_name(type_name):
    """The name of the GGUF file ``export`` writes into ``--out`` for ``--type type_name``."""
    return f"model-{type_name}.gguf"


def resolve_source(source):
    """``(adapter directory, run directory or None)`` for an adapter directory or a run's
    output directory (whose ``final/`` holds the adapter)."""
    path = Path(source).expanduser()
    if (path / "final" / "adapter_config.json").is_file():
        return path / "final", path
    if (path / "adapter_config.json").is_file():
        run = path.parent if (path.parent / "config.json").is_file() and path.name == "final" else None
        return path, run
    if (path / "final").is_dir() or (path / "config.json").is_file():
        raise ExportError(
            f"{source}: a run directory without an adapter in final/ (the run did not finish, or trained the model's "
            f"own weights: that final/ is already a transformers model); finish it with ftengine run --resume"
        )
    raise ExportError(
        f"{source}: neither an adapter directory (adapter_config.json) nor a run directory (final/); check the path"
    )


def base_model_of(adapter_dir, run_dir, model):
    """The base model to merge into: ``--model``, else the run's ``model``, else the one the
    adapter names."""
    if model:
        return model
    if run_dir is not None:
        name = json.loads((run_dir / "config.json").read_text()).get("model")
        if name:
            return name
    name = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not name:
        raise ExportError(f"{adapter_dir}: the adapter does not name its base model; give it with --model")
    return name


def declared_architecture(model_name):
    """The ``model_type`` of a local model directory or GGUF file, read without loading weights
    (``None`` for others: checked once the model is built)."""
    path = Path(model_name).expanduser()
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text()).get("model_type")
    if path.suffix == ".gguf" and path.is_file():
        import gguf

        field = gguf.GGUFReader(path).get_field("general.architecture")
        return field.contents() if field is not None else None
    return None


def export_model(
    source,
    out_dir,
    format="gguf",
    type_name="f16",
    model=None,
    plugins=(),
    overwrite=False,
    strict=False,
    allow_pickle=False,
):
    """Merge the adapter of ``source`` (an adapter directory or a run directory) into its base
    and write it to ``out_dir``: ``model-<type>.gguf`` (``format="gguf"``) or a transformers
    directory (``"safetensors"``), with a ``README.md`` model card; return the paths written.

    :param model: the base model (default: the run's, or the one the adapter names).
    :param plugins: plugins to activate besides the adapter's own (a third-party method).
    :raises FtengineError: for an unusable source, ``out_dir``, architecture or type, before the
        base loads where the input allows.
    """
    if format not in FORMATS:
        raise ExportError(f"--format {format}: not one of {', '.join(FORMATS)}")
    if format == "gguf" and type_name not in TYPES:
        raise ExportError(f"--type {type_name}: not one of {', '.join(TYPES)}")
    adapter_dir, run_dir = resolve_source(source)
    base = base_model_of(adapter_dir, run_dir, model)
    check_merge_target(out_dir, adapter_dir, base, overwrite)
    if format == "gguf" and (model_type := declared_architecture(base)) is not None:
        gguf_architecture(model_type, f"base model {base}")
    merged, tokenizer = merged_model(base, adapter_dir, plugins, allow_pickle, strict, full_precision=True)
    if format == "gguf":
        gguf_architecture(merged.config.model_type, f"base model {base}")
    card = model_card(adapter_dir, run_dir, base, format, type_name)
    try:
        with atomic_directory(out_dir) as tmp:
            if format == "gguf":
                other_types = write_gguf(merged, tokenizer, tmp / gguf_file_name(type_name), type_name, name=card.name)
                card.note_other_types(other_types)
            else:
                merged.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
            atomic_write_text(tmp / "README.md", card.render())
            written = sorted(Path(out_dir) / p.name for p in tmp.iterdir())
    except OSError as exc:
        raise storage_error(exc, out_dir, "the export", kept=f"Nothing was written to {out_dir}; what it held is intact") from exc
    return written


@click.command(name="export")
@click.argument("source", metavar="ADAPTER_DIR_OR_RUN", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--format", "format_", type=click.Choice(FORMATS), default="gguf", show_default=True, help="What to write (see below)."
)
@click.option(
    "--type",
    "type_name",
    type=click.Choice(list(TYPES)),
    default="f16",
    show_default=True,
    help="GGUF tensor type of the weight matrices (norms and 1-D tensors stay f32).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write (new or empty).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it is a non-empty directory (never the adapter's own).")
@click.option("--model", default=None, help="Base model (default: the run's model, else the one the adapter names).")
@click.option("--allow-pickle", is_flag=True, help="Load base weights from pickle files (pytorch_model.bin); they can run code.")
@strict_option
@click.option("--plugin", "-p", "plugins", multiple=True, help="Activate another plugin (repeatable), e.g. a third-party method.")
def export_command(source, format_, type_name, out, overwrite, model, allow_pickle, strict, plugins):
    """Merge an adapter into its full-precision base and write it for other runtimes.

    ADAPTER_DIR_OR_RUN is an adapter directory or a run's output_dir (its final/ holds the
    adapter). A QLoRA adapter is merged into the original full-precision base, not into its
    4-bit copy.

    --format gguf writes OUT/model-TYPE.gguf (llama.cpp, Ollama, LM Studio) with the tokenizer
    and chat template: llama, mistral and qwen2 models. --format safetensors writes a merged
    transformers directory. Both add OUT/README.md, a model card (base, method, data sha256,
    steps, the run's final metrics).
    """
    written = export_model(source, out, format_, type_name, model, plugins, overwrite, strict, allow_pickle)
    click.echo("\n".join(f"wrote {path}" for path in written))


@hookimpl
def ftengine_register_commands(cli):
    cli.add_command(export_command)
