"""The docs cannot rot: the hook reference is generated, and every hook and option is documented."""

import importlib.util
from pathlib import Path

from click.testing import CliRunner
from ftengine import hookspecs
from ftengine.cli import cli
from ftengine.config import DataOptions, EvalOptions, TrainOptions

DOCS = Path(__file__).parent.parent / "docs"
README = Path(__file__).parent.parent / "README.md"


def test_hook_reference_is_up_to_date():
    spec = importlib.util.spec_from_file_location("generate_hooks", DOCS / "generate_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (DOCS / "hooks.md").read_text() == module.render(), "run: python docs/generate_hooks.py"


def test_every_hook_has_a_documented_signature():
    from ftengine.plugins.lora import hookspecs as lora_hookspecs

    reference = (DOCS / "hooks.md").read_text()
    for module in (hookspecs, lora_hookspecs):
        for name in dir(module):
            if name.startswith("ftengine_"):
                assert f"`{name}(" in reference


def test_every_core_option_is_in_the_config_docs():
    text = (DOCS / "configuration.md").read_text()
    for section, options in (("train", TrainOptions), ("data", DataOptions), ("eval", EvalOptions)):
        for key in options.model_fields:
            assert f"`{section}.{key}" in text, f"{section}.{key}"


def test_readme_opens_with_the_two_commands():
    lines = README.read_text().splitlines()
    commands = [line for line in lines[:30] if line.startswith(("ftengine ", "make ", "pip ", "python"))]
    assert any("make run" in c or "ftengine run" in c for c in commands)
    assert any("make test" in c for c in commands)


def test_cli_help_lists_the_commands():
    output = CliRunner().invoke(cli, ["--help"]).output
    listed = output[output.index("\nCommands:\n") :].splitlines()[2:]
    assert [line.split()[0] for line in listed if line.strip()] == sorted(cli.commands)
    assert {"run", "plugins", "merge", "generate"} <= set(cli.commands)


def test_every_plugin_package_is_in_the_wheel():
    """Editable installs find subpackages anyway; a wheel only holds those listed."""
    import tomllib

    root = Path(__file__).parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {f"ftengine.plugins.{p.parent.name}" for p in (root / "plugins").glob("*/__init__.py")}
    assert packages <= listed
