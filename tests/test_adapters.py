"""The adapter layer every adapter plugin shares (``ftengine.adapters``), and the rule that the
core names no plugin: which plugins load an adapter is asked of the plugins."""

import ast
import json
import re
import stat
from pathlib import Path

import pytest
import torch
from ftengine.adapters import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    read_adapter_config,
    read_adapter_tensors,
    short_target_names,
    write_adapter,
)
from ftengine.build import build, configure
from ftengine.errors import AdapterError
from ftengine.inference import load_for_inference
from ftengine.loop import save
from ftengine.methods import adapter_methods, plugins_for_adapter
from ftengine.pluginmanager import builtin_plugins

CORE = Path(__file__).resolve().parent.parent / "core"


def trained_adapter(model_dir, tmp_path, plugins, overrides=()):
    """Save a freshly built adapter of the tiny model (no training needed for file checks)."""
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    config, pm = configure(None, plugins, [f"model={model_dir}", f"data.train={data}", *overrides])
    model, tokenizer, _ = build(config, pm)
    return save(model, tokenizer, config, pm, tmp_path / "adapter")


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plugins", [["lora"], ["prompt_tuning"]])
def test_adapter_files_get_the_mode_of_their_neighbours(tiny_model_dir, tmp_path, plugins):
    saved = trained_adapter(tiny_model_dir, tmp_path, plugins)
    (tmp_path / "neighbour").write_text("an ordinary file, created with the umask's mode")
    expected = stat.S_IMODE((tmp_path / "neighbour").stat().st_mode)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in saved.iterdir()} == dict.fromkeys(
        [p.name for p in saved.iterdir()], expected
    )


def test_all_linear_is_saved_as_short_target_names(tiny_model_dir, tmp_path):
    saved = trained_adapter(tiny_model_dir, tmp_path, ["lora"], ["lora.target_modules=all-linear"])
    names = read_adapter_config(saved)["target_modules"]
    assert names == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_short_names_fall_back_to_paths_when_they_would_select_more():
    paths = ["model.layers.0.q_proj", "model.layers.1.q_proj", "model.layers.0.v_proj"]
    assert short_target_names(paths[:2], paths) == ["q_proj"]
    assert short_target_names(paths[:1], paths) == ["model.layers.0.q_proj"]


def test_write_and_read_round_trip(tmp_path):
    tensors = {"base_model.model.x.lora_A.weight": torch.arange(6.0).view(2, 3)}
    write_adapter(tmp_path, {"peft_type": "LORA", "r": 2}, tensors)
    assert read_adapter_config(tmp_path) == {"peft_type": "LORA", "r": 2}
    assert torch.equal(
        read_adapter_tensors(tmp_path)["base_model.model.x.lora_A.weight"], tensors["base_model.model.x.lora_A.weight"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temporary left


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a readable safetensors file"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{", "not a readable safetensors file"),
    ],
)
def test_an_empty_or_truncated_weights_file_is_an_adapter_error(tmp_path, content, message):
    (tmp_path / WEIGHTS_FILE).write_bytes(content)
    with pytest.raises(AdapterError, match=message) as error:
        read_adapter_tensors(tmp_path)
    assert str(tmp_path / WEIGHTS_FILE) in str(error.value)


@pytest.mark.parametrize(
    "text, message",
    [("{", "not valid JSON"), ("[]", "expected a JSON object"), (b"\xff\xfe", "not UTF-8 text")],
)
def test_a_malformed_config_is_an_adapter_error(tmp_path, text, message):
    path = tmp_path / CONFIG_FILE
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(AdapterError, match=message):
        read_adapter_config(tmp_path)


# --------------------------------------------------------------------------------------------
# names: one collision rule for every adapter plugin
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plugins", [["lora"], ["prompt_tuning"]])
def test_a_second_adapter_under_a_loaded_name_is_refused(tiny_model_dir, tmp_path, plugins):
    saved = trained_adapter(tiny_model_dir, tmp_path, plugins)
    model, _, pm = load_for_inference(str(tiny_model_dir), {"a": saved})
    config, _ = configure(plugins=plugins, base={"model": str(tiny_model_dir)}, require_data=False)
    with pytest.raises(AdapterError, match="an adapter named 'a' is already loaded"):
        adapter_methods(pm).load(model, saved, "a", config)


# --------------------------------------------------------------------------------------------
# which plugins load an adapter
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "adapter_config, plugins",
    [
        ({"peft_type": "LORA"}, ["lora"]),
        ({"peft_type": "LORA", "use_dora": True}, ["lora", "dora"]),
        ({"peft_type": "PROMPT_TUNING"}, ["prompt_tuning"]),
    ],
)
def test_plugins_claim_the_adapters_they_load(tmp_path, adapter_config, plugins):
    (tmp_path / CONFIG_FILE).write_text(json.dumps(adapter_config))
    assert plugins_for_adapter(tmp_path) == plugins


def test_an_adapter_no_plugin_claims_names_its_type(tmp_path):
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"peft_type": "VERA"}))
    with pytest.raises(AdapterError, match="no installed plugin loads peft_type 'VERA'"):
        plugins_for_adapter(tmp_path)


def _code_strings(tree):
    """String constants of a module that are neither docstrings nor ``help=`` texts."""
    skipped = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            skipped.add(id(body[0].value))
        if isinstance(node, ast.keyword) and node.arg == "help":
            skipped.update(id(n) for n in ast.walk(node.value))
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skipped]


def test_the_core_names_no_plugin():
    """Plugin names appear in core/ only in docstrings and help examples."""
    names = set(builtin_plugins())
    found = []
    for path in sorted(CORE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        words = {w for s in _code_strings(tree) for w in re.findall(r"\w+", s)}
        identifiers = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
            n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
        }
        found += [f"{path.relative_to(CORE)}: {name}" for name in sorted(names & (words | identifiers))]
    assert not found
