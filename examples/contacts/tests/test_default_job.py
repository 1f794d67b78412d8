"""The default job is the demo package's data, not the engine's: ``ftengine run`` with no
arguments asks the installed plugins (hook ``ftengine_default_job``) and, with none installed,
says how to get one."""

from click.testing import CliRunner
from ftengine import pluginmanager
from ftengine.build import configure
from ftengine.cli import cli
from ftengine_contacts import default_job


def test_the_installed_demo_provides_a_default_job_the_engine_accepts(tmp_path, monkeypatch):
    monkeypatch.setenv("FTENGINE_CACHE", str(tmp_path / "cache"))
    job = pluginmanager.all_plugins_manager().hook.ftengine_default_job()
    assert job == default_job.default_job_config()
    assert job["plugins"] == ["lora", "contacts", "drift"] and job["train"]["max_steps"] == 544
    data_dir = tmp_path / "cache" / "data" / default_job.DATA_VERSION
    assert job["data"]["eval_sets"] == {"heldout": str(data_dir / "heldout.jsonl"), "blind": str(data_dir / "blind.jsonl")}
    for path in (job["data"]["train"], job["data"]["eval"], *job["data"]["eval_sets"].values()):
        assert (data_dir / path).is_file()
    config, pm = configure(None, [], [f"output_dir={tmp_path / 'run'}", "model=unused"], base=job)
    assert config.lora.r == 16 and {"lora", "contacts", "drift"} <= pluginmanager.active_names(pm)


def test_without_a_task_package_run_with_no_arguments_says_how_to_get_the_demo(monkeypatch):
    installed = pluginmanager.entry_point_plugins()
    monkeypatch.setattr(pluginmanager, "entry_point_plugins", lambda: {k: v for k, v in installed.items() if k != "contacts"})
    result = CliRunner().invoke(cli, ["run"])
    assert result.exit_code == 2
    assert "no default job is installed" in result.output and "pip install ./examples/contacts" in result.output


def test_the_engine_ships_no_demo():
    assert "contacts" not in pluginmanager.builtin_plugins()
