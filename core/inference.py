"""Inference with adapters: load several over one base model, switch between them, merge.

    model, tokenizer, pm = load_for_inference("models/base", {"support": "runs/a/final", "sales": "runs/b/final"})
    set_adapter(model, pm, "sales")              # hot swap: no reload; None = the base model
    generate(model, tokenizer, ["Hi!"], max_new_tokens=32)

    ftengine generate --model models/base --adapter support=runs/a/final --prompt "Hi!"
    ftengine merge --model models/base --adapter runs/a/final --out models/merged

The plugins an adapter needs are the ones whose adapter methods claim its
``adapter_config.json`` (``AdapterMethod.claims``, asked of every installed plugin);
``--plugin`` adds others (``qlora`` to run over a 4-bit base). Loading, switching and merging
go to the method that holds the adapter (``ftengine.methods.AdapterMethods``).
"""

import json
from pathlib import Path

import click
import torch

from .adapters import check_base
from .build import build, configure
from .checkpoint import atomic_directory
from .data import render_prompt
from .errors import AdapterError, FtengineError
from .methods import adapter_methods, plugins_for_adapter
from .modeling import generate_greedy
from .pluginmanager import allow_pickle_sections, plugin_attribute


def load_for_inference(model_name, adapters, plugins=(), sections=None, strict=False):
    """Build ``model_name`` and load ``adapters`` (``{name: directory}``) into it.

    :param sections: config sections for the plugins (``{"qlora": {"blocksize": 64}}``).
    :param strict: refuse an adapter trained on another base model (default: warn).
    :return: ``(model, tokenizer, pm)``; the model is in eval mode, frozen, with the first
        adapter active (the base model if ``adapters`` is empty).
    """
    model, tokenizer, pm, _ = build_for_inference(model_name, adapters, plugins, sections, strict)
    return model, tokenizer, pm


def build_for_inference(model_name, adapters, plugins=(), sections=None, strict=False):
    """``load_for_inference``, also returning the run ``Config`` (to load more adapters later
    with ``load_adapter``): ``(model, tokenizer, pm, config)``."""
    needed = [*plugins, *(p for path in adapters.values() for p in plugins_for_adapter(path))]
    base = {"model": model_name, **(sections or {})}
    config, pm = configure(plugins=list(dict.fromkeys(needed)), base=base, require_data=False)
    model, tokenizer, _ = build(config, pm, training=False)
    for name, path in adapters.items():
        model = load_adapter(model, config, pm, name, path, strict)
    if adapters:
        set_adapter(model, pm, next(iter(adapters)))
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer, pm, config


def load_adapter(model, config, pm, name, path, strict=False):
    """Load the adapter directory ``path`` into ``model`` under ``name``; return the model to
    use from now on (a plugin may wrap it). An adapter trained on another base model is
    refused with ``strict``, and loaded with a warning otherwise."""
    check_base(path, model, strict)
    return adapter_methods(pm).load(model, path, name, config)


def set_adapter(model, pm, name):
    """Make adapter ``name`` the active one, or use the base model alone with ``None``."""
    adapter_methods(pm).activate(model, name)


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens=64):
    """Greedy completions of ``prompts`` (user messages, rendered with the chat template when
    the tokenizer has one), generated as one left-padded batch."""
    if tokenizer.chat_template:
        texts = [render_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    else:
        texts = list(prompts)
    return generate_greedy(model, tokenizer, texts, max_new_tokens, add_special_tokens=not tokenizer.chat_template)


def base_plugins_of_run(adapter_dir):
    """``(plugins, sections)`` that changed the base model in the run that saved ``adapter_dir``.

    PEFT's format cannot say that the base was quantised; the run's ``config.json`` beside
    ``final/`` can. Merging repeats the same quantisation, so the merged model is the one the
    adapter was trained with.
    """
    run_config = Path(adapter_dir).parent / "config.json"
    if not run_config.is_file():
        return [], {}
    config = json.loads(run_config.read_text())
    plugins = [p for p in config.get("plugins", []) if plugin_attribute(p, "changes_base", False)]
    return plugins, {p: config[p] for p in plugins if p in config}


def check_merge_target(out_dir, adapter_dir, model_name=None, overwrite=False):
    """Refuse an ``--out`` that would destroy something: the adapter (or a directory holding
    it), the base model, the current directory, a file, or, without ``overwrite``, any
    non-empty directory."""
    out = Path(out_dir).expanduser().resolve()
    protected = [("the adapter being merged", Path(adapter_dir).expanduser().resolve()), ("the current directory", Path.cwd())]
    if model_name and Path(model_name).expanduser().exists():
        protected.append(("the base model", Path(model_name).expanduser().resolve()))
    for what, path in protected:
        if out == path or out in path.parents:
            where = "is" if out == path else "contains"
            raise FtengineError(f"--out {out_dir}: {where} {what} ({path}); write the merged model to a new directory")
    if out.exists() and not out.is_dir():
        raise FtengineError(f"--out {out_dir}: is a file; give a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FtengineError(
            f"--out {out_dir}: the directory is not empty and merging would replace all it holds; "
            f"choose a new directory, or pass --overwrite to replace it"
        )


def nonfinite_parameters(model):
    """Names of the parameters and buffers of ``model`` that hold NaN or infinity."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def merged_model(model_name, adapter_dir, plugins=(), allow_pickle=False, strict=False, full_precision=False):
    """Fold the adapter in ``adapter_dir`` into ``model_name``, in memory; return ``(model,
    tokenizer)``: a plain transformers model (adapter layers unwrapped) with finite weights.

    :param full_precision: load the base without the plugins that changed it in the run
        (``changes_base``: ``qlora``), so the adapter folds into the original weights rather
        than into their 4-bit round trip (what an export wants; ``merge`` keeps the base the
        adapter was trained over).
    :param strict: refuse an adapter trained on another base model (default: warn).
    :raises FtengineError: when no method merges the adapter or the merged weights are not finite.
    """
    run_plugins, sections = ([], {}) if full_precision else base_plugins_of_run(adapter_dir)
    if allow_pickle:
        sections = {**sections, **allow_pickle_sections()}
    model, tokenizer, pm = load_for_inference(model_name, {"default": adapter_dir}, [*plugins, *run_plugins], sections, strict)
    methods = adapter_methods(pm)
    if not methods.merge(model):
        raise AdapterError(
            f"{adapter_dir}: no active plugin merged this adapter into the weights; use it with its base model instead "
            f"(ftengine generate, ftengine.inference.load_for_inference)"
        )
    model = methods.unwrap(model)
    bad = nonfinite_parameters(model)
    if bad:
        raise FtengineError(
            f"{adapter_dir}: the merged model holds NaN or infinite weights ({', '.join(bad[:3])}"
            f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}); the adapter is broken (a run that diverged, "
            f"e.g. with too high a learning rate). Nothing was written"
        )
    return model, tokenizer


def merge_adapter(model_name, adapter_dir, out_dir, plugins=(), overwrite=False, allow_pickle=False, strict=False):
    """Fold the adapter in ``adapter_dir`` into ``model_name`` and write a plain transformers
    model (and tokenizer) to ``out_dir``, atomically; return its path.

    :param overwrite: replace a non-empty ``out_dir`` (never the adapter, the base model or
        the current directory).
    :param strict: refuse an adapter trained on another base model (default: warn).
    :raises FtengineError: for such an ``out_dir``, or when the merged weights are not finite.
    """
    check_merge_target(out_dir, adapter_dir, model_name, overwrite)
    model, tokenizer = merged_model(model_name, adapter_dir, plugins, allow_pickle, strict)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


# --------------------------------------------------------------------------------------------
# commands (added to the ``ftengine`` group in cli.py)
# --------------------------------------------------------------------------------------------

_plugin_option = click.option(
    "--plugin", "-p", "plugins", multiple=True, help="Activate another plugin (repeatable), e.g. qlora."
)
strict_option = click.option(
    "--strict",
    is_flag=True,
    help="Refuse an adapter trained on another base model (default: warn), as ftengine_base.json in the adapter records.",
)


@click.command()
@click.option("--model", required=True, help="Base model: local transformers dir, hub id, .gguf file or 'default'.")
@click.option("--adapter", required=True, type=click.Path(exists=True, file_okay=False), help="PEFT adapter directory.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write the merged model to.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it is a non-empty directory (never the adapter's own).")
@click.option("--allow-pickle", is_flag=True, help="Load base weights from pickle files (pytorch_model.bin); they can run code.")
@strict_option
@_plugin_option
def merge(model, adapter, out, overwrite, allow_pickle, strict, plugins):
    """Fold an adapter (LoRA, DoRA) into its base model and save a plain transformers model.

    --out must be a new or empty directory unless --overwrite is given; it is never the
    adapter's directory or one that contains it.
    """
    written = merge_adapter(model, adapter, out, plugins, overwrite=overwrite, allow_pickle=allow_pickle, strict=strict)
    click.echo(f"merged model written to {written}")


def _named_adapters(ctx, param, values):
    adapters = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"'{value}': expected NAME=DIR, e.g. support=runs/support/final")
        if name in adapters:
            raise click.BadParameter(f"'{name}' is given twice: name each adapter differently")
        adapters[name] = path
    return adapters


model_option = click.option(
    "--model", default="default", show_default=True, help="Base model: local transformers dir, hub id, .gguf file or 'default'."
)


def adapters_option(help):
    """``--adapter NAME=DIR`` (repeatable), as ``generate`` and ``serve`` take it."""
    return click.option("--adapter", "adapters", multiple=True, metavar="NAME=DIR", callback=_named_adapters, help=help)


@click.command(name="generate")
@model_option
@adapters_option("Load an adapter under NAME (repeatable).")
@click.option("--use", help="The adapter to generate with (default: the first one).")
@click.option("--prompt", "prompts", multiple=True, required=True, help="A user message (repeatable; all run as one batch).")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@strict_option
@_plugin_option
def generate_command(model, adapters, use, prompts, max_new_tokens, strict, plugins):
    """Generate greedy completions with a base model and its adapters."""
    if use is not None and use not in adapters:
        raise click.BadParameter(
            f"'{use}' is not one of the loaded adapters ({', '.join(adapters) or 'none'})", param_hint="--use"
        )
    loaded, tokenizer, pm = load_for_inference(model, adapters, plugins, strict=strict)
    if use is not None:
        set_adapter(loaded, pm, use)
    for prompt, completion in zip(prompts, generate(loaded, tokenizer, prompts, max_new_tokens)):
        click.echo(f">>> {prompt}\n{completion}\n")
