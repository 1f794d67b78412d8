"""Third-party plugins found through the ``ftengine`` entry-point group.

``make test`` installs the example package ``examples/neftune_plugin``; a checkout without it
skips these tests with the install command in the reason.
"""

import json

import pytest
from click.testing import CliRunner
from ftengine.build import configure
from ftengine.cli import cli
from ftengine.loop import train
from ftengine.pluginmanager import active_names, entry_point_plugins

pytestmark = pytest.mark.skipif(
    "neftune" not in entry_point_plugins(), reason="pip install -e examples/neftune_plugin (make test does)"
)


def test_entry_point_plugin_is_listed():
    rows = {r["name"]: r for r in json.loads(CliRunner().invoke(cli, ["plugins", "--json"]).output)}
    assert rows["neftune"]["source"].startswith("entry point (ftengine-neftune 0.1.0")
    assert "ftengine_on_train_start" in rows["neftune"]["hooks"]


def test_entry_point_plugin_runs_with_its_config_section(run_overrides, tmp_path):
    config, pm = configure(None, ["full", "neftune"], run_overrides + ["neftune.alpha=5"])
    assert "neftune" in active_names(pm) and config.neftune.alpha == 5
    noisy = train(config, pm)
    config, pm = configure(None, ["full"], run_overrides + [f"output_dir={tmp_path / 'plain'}"])
    plain = train(config, pm)
    assert noisy["after"]["eval_loss"] != plain["after"]["eval_loss"]


def test_entry_point_plugin_config_is_validated(run_overrides):
    from ftengine.errors import ConfigError

    with pytest.raises(ConfigError, match="neftune.alpha: Input should be greater than 0"):
        configure(None, ["full", "neftune"], run_overrides + ["neftune.alpha=0"])
