"""Configure and build a run: the config and plugin set, then the model ready to train or serve.

    config, pm = configure("job.yaml", plugins=["lora"], overrides=["lora.r=8"])
    model, tokenizer, info = build(config, pm)                  # to train
    model, tokenizer, info = build(config, pm, training=False)  # to load adapters into

``ftengine.loop.train`` calls both; inference and ``ftengine merge`` build with
``training=False``, so method plugins add no fresh adapter and the adapters come from files.
"""

import torch

from .adapters import record_base
from .config import apply_overrides, build_config, plugin_sections, read_yaml, requested_plugins
from .distributed import launched_world_size, no_parallel_plugin_message
from .errors import ConfigError, FtengineError
from .evaluation import baseline_problems
from .methods import adapter_methods
from .pluginmanager import active_names, available_plugins, select_plugins


def configure(config_path=None, plugins=(), overrides=(), base=None, require_data=True, world_size=None):
    """Read and validate a run's config and select its plugins; raise every problem at once.

    :param config_path: a YAML file, or ``None``.
    :param plugins: plugin names added to the config's ``plugins:`` list.
    :param overrides: ``section.key=value`` strings.
    :param base: a dict of defaults the file and overrides apply on top of (the default job).
    :param require_data: ``False`` for jobs that train nothing (merge, inference).
    :param world_size: the number of processes the run will have (default: as launched,
        ``WORLD_SIZE``); above 1 a plugin must parallelise the run.
    :return: ``(config, pm)``.
    """
    data, origins = dict(base or {}), {}
    if config_path is not None:
        file_data, origins = read_yaml(config_path)
        data = _deep_merge(data, file_data)
    apply_overrides(data, origins, overrides)
    requested = requested_plugins(data, origins, plugins)
    data["plugins"] = requested
    pm = select_plugins(requested)
    sections = plugin_sections(pm)
    owners = {name: name for name in available_plugins()}
    config = build_config(data, origins, sections, plugin_for_section=owners)
    problems = [
        m for messages in pm.hook.ftengine_validate(config=config, active=active_names(pm), pm=pm) for m in messages or ()
    ]
    if require_data and not config.data.train:
        problems.append("data.train: no training data given: set data.train to a JSONL file")
    if require_data and not (pm.hook.ftengine_trainable_params.get_hookimpls() or adapter_methods(pm).methods):
        problems.append(
            "no active plugin trains anything: add a method plugin with --plugin (run 'ftengine plugins' to list them)"
        )
    problems += baseline_problems(config, pm)
    world_size = launched_world_size() if world_size is None else world_size
    if require_data and world_size > 1 and not pm.hook.ftengine_parallelize.get_hookimpls():
        problems.append(no_parallel_plugin_message(world_size))
    if problems:
        raise ConfigError(problems)
    return config, pm


def _deep_merge(base, override):
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def pick_device(config):
    if config.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(["train.device: 'cuda' was asked for but no CUDA device is available; use 'auto' or 'cpu'"])
    if config.train.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def weight_bytes(model):
    """Bytes held by the model's parameters and buffers (4-bit weights count as packed)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def build(config, pm, training=True, device=None):
    """Load the model, quantise it, inject adapters, wrap it and freeze all but the adapters.

    :param training: ``False`` to build for inference or merging: adapter methods add no fresh
        adapter (adapters are then loaded from files, ``AdapterMethod.load``).
    :return: ``(model, tokenizer, info)``; ``info`` holds weight bytes before/after
        quantisation, the trainable parameter names and the name of the trained adapter.
    """
    device = device or pick_device(config)
    torch.manual_seed(config.train.seed)
    model, tokenizer = pm.hook.ftengine_load_model(config=config)
    record_base(model, config.model)  # as loaded: before quantisation and adapters change it
    model.to(device)
    info = {"weight_bytes": weight_bytes(model)}
    if pm.hook.ftengine_quantize_model(model=model, config=config):
        info["weight_bytes_quantized"] = weight_bytes(model)
    methods = adapter_methods(pm)
    trainable = set()
    if training:
        # Adapters are created from this seed, so a resumed run rebuilds them identically.
        torch.manual_seed(config.train.seed)
        model = methods.inject(model, tokenizer, config).to(device)
        trainable = methods.trainable_names(model)
        for names in pm.hook.ftengine_trainable_params(model=model, config=config):
            trainable |= set(names)
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    unknown = trainable - {n for n, _ in model.named_parameters()}
    if unknown:
        raise FtengineError(f"plugins named trainable parameters the model does not have: {sorted(unknown)[:3]}")
    info["trainable"] = sorted(trainable)
    info["adapter_name"] = methods.adapter_name(config) if training else None
    return model, tokenizer, info
