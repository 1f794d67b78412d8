"""Run configuration: YAML file + ``-o section.key=value`` overrides, validated all at once.

The core owns the ``model``, ``output_dir``, ``plugins``, ``data``, ``train`` and ``eval`` keys; each
plugin adds one section through ``ftengine_config_section``. Every problem (unknown key, bad
value, contradictory options, a plugin's own checks) is collected into one ``ConfigError``
whose lines name the key, where it was set (``file:line`` or ``-o``) and the fix.
"""

import difflib
import os
import reprlib
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    StringConstraints,
    ValidationError,
    create_model,
)

from .errors import ConfigError

CORE_KEYS = ("model", "output_dir", "plugins", "data", "train", "eval")

#: A path-valued key (model, data, output_dir): a leading ``~`` or ``~user`` is that home
#: directory, as in a shell; YAML and ``-o`` values reach us unexpanded. Hub ids never start with ``~``.
UserPath = Annotated[str, AfterValidator(os.path.expanduser)]

#: Values a config may expand to, aliases counted each time they are used. A real config holds
#: a few hundred; nested aliases ("billion laughs") expand a few hundred bytes to billions.
MAX_CONFIG_VALUES = 10_000

_short = reprlib.Repr()
_short.maxstring = _short.maxother = _short.maxlong = 60
_short.maxlist = _short.maxtuple = _short.maxdict = _short.maxset = 5
_short.maxlevel = 3


def shown(value):
    """``repr(value)`` cut to a line, for messages that echo what the user wrote: a message
    must stay readable whatever the value (a 100 kB string, a deeply nested list)."""
    return _short.repr(value)


def at_most(limit, why):
    """A pydantic validator refusing values above ``limit``, with ``why`` as the fix."""

    def check(value):
        if value > limit:
            raise ValueError(f"at most {limit}: {why}")
        return value

    return AfterValidator(check)


class Section(BaseModel):
    """Base class for a config section: unknown keys are errors, values are checked on assignment,
    and no float may be infinite or NaN (a step, a rate or a decay of .inf is never meant).

    A section declares, as class attributes, what the core must know of its keys:

    * ``aliases``: ``{name other tools use: our key}`` (``{"lora_alpha": "alpha"}``), suggested
      for an unknown key that no spelling match finds;
    * ``resume_safe``: ``{key: why}`` for the keys a resumed run may change, because they do not
      change what the steps so far computed (``{"allow_pickle": "how the weights are read"}``).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
    aliases: ClassVar[dict[str, str]] = {}
    resume_safe: ClassVar[dict[str, str]] = {}


class DataFields(Section):
    """``data.fields``: the data's own column names for the fields ftengine reads."""

    prompt: str | None = Field(None, description="the user turn (with response)")
    response: str | None = Field(None, description="the answer learned (with prompt)")
    system: str | None = Field(None, description="an optional system turn, for any shape")
    messages: str | None = Field(None, description="a chat: a list of {role, content}")
    conversations: str | None = Field(None, description="a ShareGPT chat: a list of {from, value}")
    instruction: str | None = Field(None, description="Alpaca: the instruction")
    input: str | None = Field(None, description="Alpaca: the optional input, appended to the instruction")
    output: str | None = Field(None, description="Alpaca: the answer learned")


# A name that becomes part of metric names (eval_<name>_loss).
EvalSetName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$", max_length=40)]


#: The default ``data.max_row_bytes``: a longer line of JSON is refused before it is parsed.
MAX_ROW_BYTES = 1 << 20


class DataOptions(Section):
    train: UserPath | None = Field(
        None,
        description="training data: JSONL, JSON, CSV, TSV or Parquet file, a directory of them, or a hub id (org/name[:split])",
    )
    eval: UserPath | None = Field(None, description="evaluation data, as data.train")
    fields: DataFields = Field(default_factory=DataFields, description="column names, when they differ from ours")
    split: str = Field("train", description="the split of a hub dataset id (org/name:split overrides it)")
    subset: str | None = Field(None, description="the subset (configuration) of a hub dataset id")
    eval_split: float | None = Field(
        None, gt=0, lt=1, description="without data.eval: this fraction of the train data, seeded by train.seed, is held out"
    )
    limit: PositiveInt | None = Field(None, description="read at most this many rows of each data source (quick tries)")
    max_row_bytes: PositiveInt = Field(
        MAX_ROW_BYTES,
        description="a longer row is refused (JSON lines before they are parsed; other formats as JSON, before tokenising)",
    )
    eval_sets: dict[EvalSetName, UserPath] = Field(
        default_factory=dict,
        description="more evaluation sets, {name: source}, each read as data.eval and logged as eval_<name>_<metric>",
    )


class TrainOptions(Section):
    max_steps: PositiveInt | None = Field(None, description="optimiser steps (or set epochs)")
    epochs: PositiveFloat | None = Field(None, description="passes over the data (default 1)")
    batch_size: PositiveInt = Field(8, description="examples per micro-batch")
    grad_accum: Annotated[
        PositiveInt,
        at_most(
            1024,
            "each optimiser step holds this many micro-batches; for more examples per step raise "
            "train.batch_size (examples per step = batch_size × grad_accum)",
        ),
    ] = Field(1, description="micro-batches per optimiser step")
    lr: PositiveFloat = Field(2e-4, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: NonNegativeInt = Field(0, description="linear warmup, then cosine decay")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of lr")
    max_grad_norm: PositiveFloat | None = Field(1.0, description="gradient clipping; null = off")
    max_length: PositiveInt = Field(
        512, description="longer sequences are truncated (counted); with packing, the packed row length"
    )
    packing: bool = Field(
        False, description="pack examples into rows of max_length, attention confined to each example (no padding)"
    )
    group_by_length: bool = Field(
        False,
        description="batch examples of similar length (seeded, chunks of 64 batches) to pad less; the alternative to packing",
    )
    seed: Annotated[
        NonNegativeInt, at_most(2**63 - 1, "a seed is a 64-bit integer; a small one seeds as well as a large one")
    ] = 0
    log_every: PositiveInt = 1
    eval_every: NonNegativeInt = Field(0, description="evaluate every N steps; 0 = at the end only")
    save_every: NonNegativeInt = Field(0, description="checkpoint every N steps; 0 = never")
    eval_batch_size: PositiveInt = 16
    gradient_checkpointing: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="bf16: compute under bfloat16 autocast (weights and optimiser stay fp32); fp32: no autocast; "
        "auto: bf16 on CUDA, fp32 on a CPU",
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a NaN/inf loss or gradient norm: stop the run, or skip the step (no update)"
    )
    max_nonfinite_skips: NonNegativeInt = Field(10, description="with on_nonfinite: skip, stop after this many skipped steps")
    dist_timeout_s: PositiveInt = Field(
        600, description="on several processes: how long a rank waits for the others in a collective before the run fails"
    )


class EvalOptions(Section):
    baselines: list[Literal["zero_shot", "few_shot"]] = Field(
        default_factory=list,
        description="before training, also evaluate the base model as is (zero_shot) and prompted with "
        "few_shot_k training examples (few_shot), to compare fine-tuning against prompting",
    )
    few_shot_k: PositiveInt = Field(3, description="training examples placed before each prompt by the few_shot baseline")
    baseline_rows: PositiveInt | None = Field(
        None,
        description="score the baselines on the first N rows of each evaluation set only (they cost as much as any evaluation)",
    )


class BaseConfig(Section):
    """The core keys; plugin sections are added by ``config_model``."""

    model: UserPath = Field("default", description="local HF dir, hub id, .gguf file or 'default' (~ is the home directory)")
    output_dir: UserPath = Field("runs/latest", description="where checkpoints and results go (~ is the home directory)")
    plugins: list[str] = Field(default_factory=list, description="plugins to activate")
    data: DataOptions = Field(default_factory=DataOptions)
    train: TrainOptions = Field(default_factory=TrainOptions)
    eval: EvalOptions = Field(default_factory=EvalOptions)


# A run's config is built per plugin set (``config_model``): the core keys of ``BaseConfig``
# plus one section per active plugin, reached as attributes (``config.lora``). Hook
# annotations call it ``Config``.
Config = BaseConfig


def config_model(sections):
    """The pydantic model of a whole config: the core keys plus ``sections`` (name -> model)."""
    fields = {name: (model, Field(default_factory=model)) for name, model in sections.items()}
    return create_model("Config", __base__=BaseConfig, **fields)


def plugin_sections(pm):
    """Collect ``{section name: model}`` from ``ftengine_config_section``; duplicates are errors."""
    sections, problems = {}, []

    def register(name, model):
        if name in sections or name in CORE_KEYS:
            problems.append(f"config section '{name}' is registered twice: rename one plugin's section")
        sections[name] = model

    pm.hook.ftengine_config_section(register=register)
    if problems:
        raise ConfigError(problems)
    return sections


# --------------------------------------------------------------------------------------------
# reading YAML and overrides, remembering where each key was set
# --------------------------------------------------------------------------------------------


def _yaml_lines(node, prefix, out):
    """Map dotted key paths to 1-based line numbers by walking YAML nodes."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = prefix + (str(key_node.value),)
            out[path] = key_node.start_mark.line + 1
            _yaml_lines(value_node, path, out)


def _check_expansion(root, where):
    """Refuse a YAML graph that expands to more than ``MAX_CONFIG_VALUES`` values. An alias is
    one node however often it is used, so the graph itself stays small; what it expands to (in
    the constructed config, in a message echoing it) can be billions of values, or endless.
    The message names the line of the top-level entry that expands (an alias has no line of
    its own in the graph)."""
    pending, count = [(root, root.start_mark)], 0
    while pending:
        node, mark = pending.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ConfigError(
                [
                    f"{where(mark)}: the YAML expands to more than {MAX_CONFIG_VALUES:,} values through aliases "
                    f"(*name) that repeat or nest anchored collections; a config holds a few hundred: write the "
                    f"values out, or use aliases of single values"
                ]
            )
        if isinstance(node, yaml.SequenceNode):
            children = [(item, item.start_mark) for item in node.value]
        elif isinstance(node, yaml.MappingNode):  # a value is placed at its key's line
            children = [(item, key.start_mark) for key, value in node.value for item in (key, value)]
        else:
            continue
        pending.extend((child, child_mark if node is root else mark) for child, child_mark in children)


def _load_yaml(text, where):
    """``(node, data)`` of a YAML document, refused if it expands past ``MAX_CONFIG_VALUES``
    before anything is built from it. ``where(mark)`` names a place in it for messages."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        _check_expansion(node, where)
        return node, loader.construct_document(node)
    finally:
        loader.dispose()


def _decode(raw, path):
    """The text of a config file; a byte that is not UTF-8 is reported with its line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError([f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8"]) from None


def read_yaml(path):
    """Read a YAML config file into ``(dict, {key path: "file:line"})``."""
    path = Path(path)
    try:
        text = _decode(path.read_bytes(), path)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the config file ({exc.strerror})"]) from None
    try:
        node, data = _load_yaml(text, lambda mark: f"{path}:{mark.line + 1}")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: nested hundreds of levels deep; a config is a few levels of sections"]) from None
    except ValueError as exc:  # an integer of thousands of digits, a date like 2024-13-45
        raise ConfigError([f"{path}: a value YAML cannot build ({shown(str(exc))}); quote it to keep it as text"]) from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}:1: the config must be a mapping of sections, not {type(data).__name__}"])
    lines = {}
    _yaml_lines(node, (), lines)
    return data, {key: f"{path}:{line}" for key, line in lines.items()}


def apply_overrides(data, origins, overrides):
    """Apply ``section.key=value`` strings (values parsed as YAML) to ``data`` in place."""
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(f"-o {shown(item)}: expected section.key=value, e.g. -o train.lr=1e-4")
            continue
        parts = key.strip().split(".")
        try:
            value = _load_yaml(raw, lambda mark, key=key: f"-o {key}")[1] if raw.strip() else None
        except ConfigError as exc:
            problems += exc.problems
            continue
        except (yaml.YAMLError, ValueError, RecursionError):  # not YAML: the string as written
            value = raw
        target = data
        for part in parts[:-1]:
            if not isinstance(target.get(part, {}), dict):
                problems.append(f"-o {shown(item)}: '{part}' is not a section")
                break
            target = target.setdefault(part, {})
        else:
            target[parts[-1]] = value
            origins[tuple(parts)] = f"-o {key}"
    if problems:
        raise ConfigError(problems)


def requested_plugins(data, origins, extra=()):
    """The plugin names the config's ``plugins:`` asks for, then ``extra`` (``--plugin``), each
    once. ``plugins:`` is a list, or a string as written by hand (``plugins: lora`` or
    ``plugins: lora, dora``): one name or several separated by commas."""
    value = data.get("plugins")
    names = [name.strip() for name in value.split(",")] if isinstance(value, str) else value
    if names is None:
        names = []
    if not isinstance(names, list) or not all(isinstance(name, str) and name for name in names):
        where = origins.get(("plugins",))
        raise ConfigError(
            [
                f"{where + ': ' if where else ''}plugins: expected a list of plugin names, e.g. plugins: [NAME, ...] (got {shown(value)})"
            ]
        )
    return list(dict.fromkeys([*names, *extra]))


#: Names other tools use for a key, too far from ours for a spelling match to find.
KEY_ALIASES = {
    "learning_rate": "lr",
    "lr_rate": "lr",
    "steps": "max_steps",
    "num_steps": "max_steps",
    "train_steps": "max_steps",
    "num_train_epochs": "epochs",
    "epoch": "epochs",
    "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "gradient_accumulation": "grad_accum",
    "warmup": "warmup_steps",
    "clip_grad_norm": "max_grad_norm",
    "grad_clip": "max_grad_norm",
    "max_seq_length": "max_length",
    "seq_len": "max_length",
    "logging_steps": "log_every",
    "eval_steps": "eval_every",
    "save_steps": "save_every",
}


def _section_at(model, loc):
    """The pydantic model at ``loc`` (a tuple of keys) of ``model``, or ``None``."""
    for part in loc:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _suggest(key, section):
    """The key of ``section`` that ``key`` was probably meant to be: an alias the section (or
    the core) declares, else a close spelling."""
    allowed = list(section.model_fields) if section else []
    alias = {**KEY_ALIASES, **getattr(section, "aliases", {})}.get(key.lower())
    if alias in allowed:
        return [alias]
    return difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)


def resume_safe_keys(config):
    """``{"section.key": why}``: the keys of ``config``'s sections that a resumed run may change,
    as each section declares them (``Section.resume_safe``)."""
    return {
        f"{name}.{key}": why
        for name in type(config).model_fields
        if isinstance(section := getattr(config, name), Section)
        for key, why in type(section).resume_safe.items()
    }


def _describe(error, model, origins, plugin_for_section):
    loc = tuple(str(p) for p in error["loc"])
    key = ".".join(loc) or "(config)"
    where = origins.get(loc) or origins.get(loc[:1])
    prefix = f"{where}: {key}" if where else key
    if error["type"] == "extra_forbidden":
        section = _section_at(model, loc[:-1])
        allowed = list(section.model_fields) if section else []
        close = _suggest(loc[-1], section)
        hint = f" Did you mean '{'.'.join(loc[:-1] + (close[0],))}'?" if close else ""
        if len(loc) == 1 and loc[0] in plugin_for_section:
            hint = f" It belongs to plugin '{plugin_for_section[loc[0]]}': add --plugin {plugin_for_section[loc[0]]}, or remove the section."
        known = ", ".join(allowed)
        return f"{prefix}: unknown key.{hint} Known keys here: {known}."
    message = error["msg"].removeprefix("Value error, ")
    if "input" in error and error["type"] not in ("missing",):
        message += f" (got {shown(error['input'])})"
    return f"{prefix}: {message}"


def _contradictions(data, origins):
    """Problems between keys, checked on the raw data so they show beside per-key errors."""
    train = data.get("train") if isinstance(data.get("train"), dict) else {}
    problems = []
    if train.get("max_steps") is not None and train.get("epochs") is not None:
        where = origins.get(("train", "epochs"))
        problems.append(f"{where + ': ' if where else ''}train.epochs: set train.max_steps or train.epochs, not both")
    if train.get("packing") is True and train.get("group_by_length") is True:
        where = origins.get(("train", "group_by_length"))
        problems.append(
            f"{where + ': ' if where else ''}train.group_by_length: packing already removes the padding that length "
            f"grouping reduces; set one of train.packing and train.group_by_length"
        )
    data_section = data.get("data") if isinstance(data.get("data"), dict) else {}
    if data_section.get("eval") is not None and data_section.get("eval_split") is not None:
        where = origins.get(("data", "eval_split"))
        problems.append(f"{where + ': ' if where else ''}data.eval_split: set data.eval or data.eval_split, not both")
    return problems


def build_config(data, origins, sections, plugin_for_section=None):
    """Validate ``data`` against the core keys plus ``sections``; raise every problem at once."""
    model = config_model(sections)
    problems = _contradictions(data, origins)
    try:
        config = model.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(e, model, origins, plugin_for_section or {}) for e in exc.errors()] + problems
    if problems:
        raise ConfigError(problems)
    return config


def dump_config(config):
    """The config as plain data (for ``config.yaml`` in the output dir and checkpoints)."""
    return config.model_dump(mode="json")
