"""Plugin discovery, selection and the errors for bad plugin sets."""

import pytest
from ftengine.errors import PluginError
from ftengine.pluginmanager import EXCLUSIVE_HOOKS, active_names, builtin_plugins, select_plugins


def test_builtins_are_discovered_and_defaults_always_active():
    assert {"hf_loader", "sft", "adamw", "progress", "full"} <= set(builtin_plugins())
    pm = select_plugins([])
    assert active_names(pm) == {"hf_loader", "sft", "adamw", "progress"}


def test_selecting_a_builtin_and_blocking_a_default():
    pm = select_plugins(["full", "no:progress"])
    assert "full" in active_names(pm)
    assert "progress" not in active_names(pm)


def test_unknown_plugin_gets_did_you_mean():
    with pytest.raises(PluginError) as error:
        select_plugins(["ful"])
    assert "plugin 'ful': unknown. Did you mean 'full'?" in str(error.value)


def test_local_module_plugin_is_selected_by_dotted_path():
    pm = select_plugins(["sample_plugins.sgd"])
    assert "sgd" in active_names(pm)


def test_every_problem_is_reported_at_once():
    with pytest.raises(PluginError) as error:
        select_plugins(["full", "sample_plugins.needs_lora", "nonsense_plugin"])
    problems = error.value.problems
    assert len(problems) == 3
    text = str(error.value)
    assert "plugin 'needs_lora' requires plugin 'lorax': add --plugin lorax." in text
    assert "plugins 'full' and 'needs_lora' conflict" in text
    assert "plugin 'nonsense_plugin': unknown" in text


def test_two_plugins_claiming_an_exclusive_hook():
    assert "ftengine_compute_loss" in EXCLUSIVE_HOOKS
    select_plugins(["sample_plugins.second_loss"])  # one replaces the default SFT loss: fine
    with pytest.raises(PluginError, match="'other_loss' and 'second_loss' both implement ftengine_compute_loss"):
        select_plugins(["sample_plugins.second_loss", "sample_plugins.other_loss"])


def test_misspelled_hookimpl_is_an_error():
    with pytest.raises(PluginError, match="ftengine_compute_los"):
        select_plugins(["sample_plugins.misspelled"])


def test_module_that_fails_to_import_is_reported():
    with pytest.raises(PluginError, match="failed to import"):
        select_plugins(["sample_plugins.does_not_exist"])


def test_trace_switch_prints_hook_calls(monkeypatch, capsys):
    monkeypatch.setenv("FTENGINE_TRACE_HOOKS", "1")
    pm = select_plugins([])
    pm.hook.ftengine_config_section(register=lambda name, model: None)
    assert "ftengine_config_section" in capsys.readouterr().err


def test_a_requirement_can_name_alternatives():
    select_plugins(["full", "sample_plugins.needs_either"])
    with pytest.raises(PluginError, match=r"requires plugin 'full' or 'lorax': add --plugin full or --plugin lorax"):
        select_plugins(["sample_plugins.needs_either"])
