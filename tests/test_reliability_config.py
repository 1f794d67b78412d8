"""Never lose a run, part two (issue 22): the config and plugin-selection cases of items 5 and 8.
Each test reproduced its failure first. The matrix is in docs/reliability.md.

The bombs run in a child process under ``RLIMIT_AS`` and a timeout, so a regression fails the
test instead of taking the machine's memory.
"""

import json
import resource
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner
from ftengine.build import configure
from ftengine.cli import cli
from ftengine.config import read_yaml
from ftengine.errors import ConfigError, PluginError

BOMB_MEMORY = 1 << 30  # bytes of address space the child may use
BOMB_TIMEOUT_S = 60


def alias_bomb(levels=9, width=9):
    """A YAML flow mapping whose ``levels`` nested aliases expand to ``width ** levels`` values."""
    anchors = ["&a0 {x: 1, y: 1}"]
    for level in range(1, levels + 1):
        refs = ", ".join(f"k{i}: *a{level - 1}" for i in range(width))
        anchors.append(f"&a{level} {{{refs}}}")
    return "[" + ", ".join(anchors) + "]"


def run_bounded(script, *args):
    """Run ``script`` (Python, reading ``sys.argv``) in a child limited to ``BOMB_MEMORY``; it
    prints a ``ConfigError`` and exits 2. Returns the finished process."""

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (BOMB_MEMORY, BOMB_MEMORY))

    body = textwrap.dedent(script)
    program = f"import sys\nfrom ftengine.errors import ConfigError\ntry:\n{textwrap.indent(body, '    ')}\nexcept ConfigError as exc:\n    print(exc)\n    sys.exit(2)\n"
    return subprocess.run(
        [sys.executable, "-c", program, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=BOMB_TIMEOUT_S,
        preexec_fn=limit_memory,
    )


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


# --------------------------------------------------------------------------------------------
# 5. config bombs exhausted memory
# --------------------------------------------------------------------------------------------


def test_5_a_yaml_alias_bomb_in_the_config_file_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(f"train:\n  max_steps: 3\nbomb: {alias_bomb()}\n")

    done = run_bounded("from ftengine.config import read_yaml\nread_yaml(sys.argv[1])", path)

    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{path}:3" in done.stdout and "alias" in done.stdout, done.stdout


def test_5_an_alias_bomb_in_an_override_gives_a_short_message():
    done = run_bounded(
        """
        from ftengine.config import apply_overrides, build_config
        data, origins = {}, {}
        apply_overrides(data, origins, [sys.argv[1]])
        build_config(data, origins, {})
        """,
        f"train.lr={alias_bomb()}",
    )

    assert done.returncode == 2, done.stderr[-2000:]
    assert "-o train.lr" in done.stdout and len(done.stdout) < 1000, done.stdout[:2000]


def test_5_anchors_and_merge_keys_of_an_ordinary_config_still_work(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("defaults: &defaults {lr: 0.001, batch_size: 4}\ntrain:\n  <<: *defaults\n  max_steps: 3\n")

    data, origins = read_yaml(path)

    assert data["train"] == {"lr": 0.001, "batch_size": 4, "max_steps": 3}
    assert origins[("train", "max_steps")] == f"{path}:4"


def test_5_long_values_are_cut_in_messages(run_overrides):
    long_value = "x" * 100_000
    for override in (f"train.lr={long_value}", f"lora.target_modules=({long_value}"):  # the core's check, lora's
        with pytest.raises(ConfigError) as caught:
            configure(None, ["lora"], run_overrides + [override])
        message = str(caught.value)
        assert override.partition("=")[0] in message and len(message) < 1000, message[:2000]

    with pytest.raises(PluginError) as caught:
        configure(None, [f"no{long_value}"], run_overrides)
    assert "unknown" in str(caught.value) and len(str(caught.value)) < 1000


# --------------------------------------------------------------------------------------------
# 8. tracebacks and silent accepts in the config and the plugin selection
# --------------------------------------------------------------------------------------------


def test_8_out_of_range_values_are_all_refused_at_once_before_the_model_loads(run_overrides):
    bad = [
        "train.seed=18446744073709551616",
        "train.max_steps=",
        "train.epochs=.inf",
        "train.weight_decay=.inf",
        "train.grad_accum=100000000000",
        "lora.r=100000000",
        "lora.alpha=.inf",
    ]
    with pytest.raises(ConfigError) as caught:
        configure(None, ["lora"], run_overrides + bad)

    problems = caught.value.problems
    for key in ("train.seed", "train.epochs", "train.weight_decay", "train.grad_accum", "lora.r", "lora.alpha"):
        assert any(key in p for p in problems), (key, problems)
    assert any("finite" in p for p in problems), problems
    assert any("train.grad_accum" in p and "batch_size" in p for p in problems), problems


def test_8_a_lora_rank_above_the_models_hidden_size_is_refused(run_overrides, tiny_model_dir):
    hidden_size = json.loads((tiny_model_dir / "config.json").read_text())["hidden_size"]

    with pytest.raises(ConfigError) as caught:
        configure(None, ["lora"], run_overrides + [f"lora.r={hidden_size + 1}"])
    message = str(caught.value)
    assert "lora.r" in message and f"hidden size ({hidden_size})" in message and "config.json" in message

    configure(None, ["lora"], run_overrides + [f"lora.r={hidden_size}"])


def test_8_plugins_must_be_a_list_of_names_and_one_name_is_accepted(run_overrides, tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  max_steps: 3\nplugins: 5\n")
    with pytest.raises(ConfigError) as caught:
        configure(path, [], run_overrides)
    assert f"{path}:3: plugins" in str(caught.value) and "[NAME, ...]" in str(caught.value)

    with pytest.raises(ConfigError, match=r"-o plugins.*got \[.lora., 5\]"):
        configure(None, [], run_overrides + ["plugins=[lora, 5]"])

    path.write_text("plugins: lora\n")
    config, pm = configure(path, [], run_overrides)
    assert config.plugins == ["lora"] and pm.has_plugin("lora")


def test_8_blocking_a_default_plugin_nothing_replaces_says_what_it_provides(run_overrides):
    for blocked, provides in (("sft", "ftengine_load_dataset"), ("hf_loader", "ftengine_load_model")):
        with pytest.raises(PluginError) as caught:
            configure(None, ["lora", f"no:{blocked}"], run_overrides)
        message = str(caught.value)
        assert f"no:{blocked}" in message and provides in message and "no other active plugin" in message

    with pytest.raises(PluginError, match="'bogus' is not a default plugin"):
        configure(None, ["lora", "no:bogus"], run_overrides)

    configure(None, ["full", "no:progress"], run_overrides)  # nothing needs the progress display


def test_8_a_config_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes(b"train:\n  max_steps: 3\n  # caf\xe9\n")

    result = invoke("run", path, "--plugin", "lora")

    assert result.exit_code == 2, result.output
    assert f"{path}:3" in result.output and "UTF-8" in result.output and "Traceback" not in result.output


def test_5_a_cyclic_alias_deep_nesting_or_an_impossible_date_is_a_message(tmp_path):
    cases = {
        "cycle": ("train:\n  max_steps: 3\nloop: &loop {again: *loop}\n", "cycle.yaml:3: the YAML expands"),
        "deep": ("x: " + "[" * 3000 + "]" * 3000 + "\n", "nested hundreds of levels deep"),
        "date": ("train:\n  started: 2024-13-45\n", "quote it to keep it as text"),
    }
    for name, (text, expected) in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        done = run_bounded("from ftengine.config import read_yaml\nread_yaml(sys.argv[1])", path)
        assert done.returncode == 2 and expected in done.stdout, (name, done.stdout, done.stderr[-1000:])
