"""``ftengine export``: a trained adapter merged into its base, as one GGUF file (llama.cpp,
Ollama, LM Studio) with an Ollama ``Modelfile``, or as a transformers directory with a model
card; or the adapter alone as a GGUF LoRA that llama.cpp applies over the base's GGUF.

    ftengine export runs/contacts --format gguf --type q8_0 --out exported/
    ftengine export runs/contacts/final --format safetensors --out merged/
    ftengine export runs/contacts --lora-only --out lora/

The adapter is merged through its method (``AdapterMethods.merge``: a method that cannot merge
is refused, naming it) into the *full-precision* base: for a QLoRA run the base is loaded
without quantisation, so the update lands on the original weights and not on their 4-bit
round trip (``ftengine.inference.merged_model(full_precision=True)``). Everything that can be
checked before the base loads is: the source, ``--out``, the base's architecture, and for
``--lora-only`` whether the adapter's method can write it as a LoRA
(``AdapterMethods.check_lora_export``). The output directory is written whole or not at all
(``ftengine.checkpoint.atomic_directory``).
"""

import json
from pathlib import Path

import click
from ftengine import hookimpl
from ftengine.adapters import read_adapter_config
from ftengine.build import configure
from ftengine.checkpoint import atomic_directory, atomic_write_text, storage_error
from ftengine.inference import check_merge_target, load_for_inference, merged_model, strict_option
from ftengine.methods import adapter_methods, plugins_for_adapter
from ftengine.pluginmanager import allow_pickle_sections

from .gguf_model import TYPES, ExportError, gguf_architecture, write_gguf
from .lora_gguf import FLOAT_TYPES, write_lora_gguf
from .model_card import lora_usage, model_card
from .ollama import modelfile

ftengine_plugin_api = 1

FORMATS = ("gguf", "safetensors")


def gguf_file_name(type_name):
    """The name of the GGUF file ``export`` writes into ``--out`` for ``--type type_name``."""
    return f"model-{type_name}.gguf"


def lora_file_name(type_name):
    """The name of the GGUF LoRA ``export --lora-only`` writes into ``--out``."""
    return f"adapter-{type_name}.gguf"


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


def check_lora_only(format, type_name):
    """Refuse a ``--lora-only`` export of a format or type a GGUF LoRA cannot be."""
    if format != "gguf":
        raise ExportError(f"--lora-only writes a GGUF LoRA: leave out --format {format}, or --lora-only for the merged model")
    if type_name not in FLOAT_TYPES:
        raise ExportError(
            f"--lora-only --type {type_name}: a GGUF LoRA holds its factors as {' or '.join(FLOAT_TYPES)} (they are small: "
            f"quantising them saves little and adds error to every update); use --type f16"
        )


def check_lora_method(adapter_dir, base, plugins):
    """Refuse, before the base loads, an adapter whose method cannot write it as a LoRA: the
    plugins that would load it are selected, and their methods asked."""
    needed = list(dict.fromkeys([*plugins, *plugins_for_adapter(adapter_dir)]))
    _, pm = configure(plugins=needed, base={"model": base}, require_data=False)
    adapter_methods(pm).check_lora_export(adapter_dir)


def adapter_with_base(base, adapter_dir, plugins, allow_pickle, strict):
    """``(model, pm)``: the full-precision base with the adapter loaded as ``default``."""
    sections = allow_pickle_sections() if allow_pickle else None
    model, _, pm = load_for_inference(base, {"default": adapter_dir}, plugins, sections, strict)
    return model, pm


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
    lora_only=False,
):
    """Merge the adapter of ``source`` (an adapter directory or a run directory) into its base
    and write it to ``out_dir``: ``model-<type>.gguf`` and an Ollama ``Modelfile``
    (``format="gguf"``) or a transformers directory (``"safetensors"``), with a ``README.md``
    model card; return the paths written.

    :param model: the base model (default: the run's, or the one the adapter names).
    :param plugins: plugins to activate besides the adapter's own (a third-party method).
    :param lora_only: write the adapter alone, ``adapter-<type>.gguf``, a GGUF LoRA for
        llama.cpp's ``--lora`` over a GGUF of the base (``type_name`` f32 or f16), instead.
    :raises FtengineError: for an unusable source, ``out_dir``, architecture, type or (with
        ``lora_only``) method, before the base loads where the input allows.
    """
    if format not in FORMATS:
        raise ExportError(f"--format {format}: not one of {', '.join(FORMATS)}")
    if format == "gguf" and type_name not in TYPES:
        raise ExportError(f"--type {type_name}: not one of {', '.join(TYPES)}")
    if lora_only:
        check_lora_only(format, type_name)
    adapter_dir, run_dir = resolve_source(source)
    base = base_model_of(adapter_dir, run_dir, model)
    check_merge_target(out_dir, adapter_dir, base, overwrite)
    if format == "gguf" and (model_type := declared_architecture(base)) is not None:
        gguf_architecture(model_type, f"base model {base}")
    if lora_only:
        check_lora_method(adapter_dir, base, plugins)
        # The factors are the adapter's whatever the base's precision: no QLoRA quantisation.
        adapter_model, pm = adapter_with_base(base, adapter_dir, plugins, allow_pickle, strict)
        gguf_architecture(adapter_model.config.model_type, f"base model {base}")
    else:
        merged, tokenizer = merged_model(base, adapter_dir, plugins, allow_pickle, strict, full_precision=True)
        if format == "gguf":
            gguf_architecture(merged.config.model_type, f"base model {base}")
    card = model_card(adapter_dir, run_dir, base, format, type_name, lora_file=lora_file_name(type_name) if lora_only else None)
    try:
        with atomic_directory(out_dir) as tmp:
            if lora_only:
                write_lora_gguf(tmp / lora_file_name(type_name), adapter_model, pm, "default", float_type=type_name)
            elif format == "gguf":
                other_types = write_gguf(merged, tokenizer, tmp / gguf_file_name(type_name), type_name, name=card.name)
                card.note_other_types(other_types)
                atomic_write_text(tmp / "Modelfile", modelfile(tokenizer, gguf_file_name(type_name)))
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
    "--format",
    "format_",
    type=click.Choice(FORMATS),
    default="gguf",
    show_default=True,
    help="What to write: one GGUF file, or a merged transformers directory.",
)
@click.option(
    "--type",
    "type_name",
    type=click.Choice(list(TYPES)),
    default="f16",
    show_default=True,
    help="GGUF tensor type of the weight matrices (norms and 1-D tensors stay f32); with --lora-only, of the LoRA factors.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write (new or empty).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it is a non-empty directory (never the adapter's own).")
@click.option("--model", default=None, help="Base model (default: the run's model, else the one the adapter names).")
@click.option("--allow-pickle", is_flag=True, help="Load base weights from pickle files (pytorch_model.bin); they can run code.")
@strict_option
@click.option("--plugin", "-p", "plugins", multiple=True, help="Activate another plugin (repeatable), e.g. a third-party method.")
@click.option(
    "--lora-only",
    is_flag=True,
    help="Write the adapter alone, OUT/adapter-TYPE.gguf, a GGUF LoRA that llama.cpp applies over a GGUF of the base "
    "(--lora); --type f32 or f16.",
)
def export_command(source, format_, type_name, out, overwrite, model, allow_pickle, strict, plugins, lora_only):
    """Merge an adapter into its full-precision base and write it for other runtimes.

    ADAPTER_DIR_OR_RUN is an adapter directory or a run's output_dir (its final/ holds the
    adapter). A QLoRA adapter is merged into the original full-precision base, not into its
    4-bit copy.

    --format gguf writes OUT/model-TYPE.gguf (llama.cpp, Ollama, LM Studio) with the tokenizer
    and chat template, and OUT/Modelfile for Ollama: llama, mistral and qwen2 models.
    --format safetensors writes a merged transformers directory. Both add OUT/README.md, a
    model card (base, method, data sha256, steps, the run's final metrics). With --lora-only,
    OUT holds the adapter as a GGUF LoRA and a card saying over which base to apply it.
    """
    written = export_model(source, out, format_, type_name, model, plugins, overwrite, strict, allow_pickle, lora_only)
    click.echo("\n".join(f"wrote {path}" for path in written))
    if lora_only:
        base = base_model_of(*resolve_source(source), model)
        click.echo(lora_usage(base, Path(out) / lora_file_name(type_name)).rstrip("\n"))


@hookimpl
def ftengine_register_commands(cli):
    cli.add_command(export_command)
