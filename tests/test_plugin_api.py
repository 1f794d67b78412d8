"""Plugin API 1.0 (issue 23): adapter methods as objects, a checked and versioned contract, the
tutorial as a test. Each test is named after the numbered point of the issue's part it covers
(1: method objects, 2: the checked contract, 3: the tutorial is the code) and reproduced the
problem before the fix.
"""

import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from ftengine.cli import cli
from ftengine.errors import PluginError
from ftengine.methods import check_method
from ftengine.pluginmanager import active_names, select_plugins


def run_plugin(plugin, tmp_path):
    """``ftengine run --plugin PLUGIN`` over a model directory that does not exist: a run that
    got past plugin selection would stop at the model, naming it."""
    args = ["run", "--plugin", plugin, "-o", f"model={tmp_path / 'no-model'}", "-o", f"output_dir={tmp_path / 'out'}"]
    return CliRunner().invoke(cli, [*args, "-o", f"data.train={tmp_path / 'train.jsonl'}"])


# --------------------------------------------------------------------------------------------
# 2. a checked, versioned contract
# --------------------------------------------------------------------------------------------


def test_2_a_hook_style_adapter_plugin_names_its_api_version_and_the_fix(tmp_path):
    pytest.importorskip("ftengine_ia3", reason="pip install -e tests/ia3_plugin (make install does)")
    result = run_plugin("sample_plugins.ia3_hooks", tmp_path)
    assert result.exit_code == 2, result.output
    assert "plugin 'ia3_hooks'" in result.output
    assert "plugin API 0" in result.output and "ftengine_adapter_methods" in result.output
    assert "CHANGELOG.md" in result.output
    assert "Traceback" not in result.output and "no-model" not in result.output  # stopped before the model
    assert not (tmp_path / "out").exists()


def test_2_a_misspelled_hook_gets_did_you_mean(tmp_path):
    result = run_plugin("sample_plugins.misspelled", tmp_path)
    assert result.exit_code == 2, result.output
    assert "plugin 'misspelled': ftengine_compute_los is not a hook. Did you mean 'ftengine_compute_loss'?" in result.output
    assert "no-model" not in result.output


def test_2_every_problem_is_reported_at_once():
    with pytest.raises(PluginError) as error:
        select_plugins(["sample_plugins.misspelled", "sample_plugins.wrong_api"])
    text = str(error.value)
    assert "ftengine_compute_los" in text and "plugin 'wrong_api'" in text


def test_2_a_method_object_missing_a_member_or_misnaming_a_parameter_is_named():
    with pytest.raises(PluginError) as error:
        select_plugins(["sample_plugins.broken_method"])
    problems = error.value.problems
    assert any(
        "plugin 'broken_method': adapter method HalfMethod has no member 'unwrap': add unwrap(self, model)" in p for p in problems
    )
    assert any("HalfMethod.load takes 'nmae', which the core does not pass. Did you mean 'name'?" in p for p in problems)


def test_2_a_hook_retired_in_a_minor_version_keeps_working_with_a_warning():
    """The mechanism for minor versions: the spec stays, marked with ``retired_hook``; a plugin
    implementing it is warned when registered and still called."""
    import types

    import pluggy
    from ftengine import hookimpl
    from ftengine.hookspecs import hookspec, retired_hook

    specs = types.SimpleNamespace()

    @hookspec(warn_on_impl=retired_hook("ftengine_old_name", "ftengine_new_name", (1, 1)))
    def ftengine_old_name(config): ...

    specs.ftengine_old_name = ftengine_old_name
    plugin = types.SimpleNamespace(ftengine_old_name=hookimpl(lambda config: f"called with {config}"))
    pm = pluggy.PluginManager("ftengine")
    pm.add_hookspecs(specs)
    with pytest.warns(
        DeprecationWarning, match=r"ftengine_old_name is deprecated since plugin API 1\.1 .* implement ftengine_new_name"
    ):
        pm.register(plugin, name="old")
    assert pm.hook.ftengine_old_name(config="x") == ["called with x"]


# --------------------------------------------------------------------------------------------
# 1. adapter methods as objects, dispatched by the core
# --------------------------------------------------------------------------------------------


@pytest.fixture
def ia3_and_lora_adapters(tmp_path):
    """Two PEFT (IA)³ adapters and a PEFT LoRA adapter of the tiny model, each changing its output."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("ftengine_ia3", reason="pip install -e tests/ia3_plugin (make install does)")
    import torch
    from ftengine.testing import tiny_model

    configs = {
        "ia3a": peft.IA3Config(
            task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
        "ia3b": peft.IA3Config(task_type="CAUSAL_LM", target_modules=["v_proj", "up_proj"], feedforward_modules=[]),
        "lora": peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "o_proj"], init_lora_weights=False),
    }
    paths = {}
    for seed, (name, config) in enumerate(configs.items()):
        model = peft.get_peft_model(tiny_model(), config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if "ia3_l" in parameter_name:
                    parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
        model.save_pretrained(tmp_path / name)
        paths[name] = tmp_path / name
    return paths


def test_1_a_name_another_method_holds_is_refused(tiny_model_dir, ia3_and_lora_adapters):
    """Each method checked names against its own adapters only: an (IA)³ adapter loaded under a
    LoRA adapter's name gave one name to two adapters, both active at once."""
    from ftengine.errors import AdapterError
    from ftengine.inference import build_for_inference, load_adapter

    model, _, pm, config = build_for_inference(str(tiny_model_dir), {"a": ia3_and_lora_adapters["lora"]}, plugins=["ia3"])
    with pytest.raises(AdapterError, match="an adapter named 'a' is already loaded"):
        load_adapter(model, config, pm, "a", ia3_and_lora_adapters["ia3a"])


def test_1_ia3_serves_mixed_batches_beside_lora(tiny_model_dir, ia3_and_lora_adapters):
    """The server refused (IA)³ adapters: the plugin had no per-row hook. Each row of a mixed
    batch now gets the logits of its adapter alone."""
    import torch
    from ftengine.inference import set_adapter
    from ftengine.serving import AdapterServer

    server = AdapterServer(str(tiny_model_dir), ia3_and_lora_adapters)
    rows = [None, "ia3a", "lora", "ia3b", "ia3a", None]
    input_ids = torch.randint(0, 256, (len(rows), 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        server._set_rows(rows)
        try:
            mixed = server.model(input_ids=input_ids).logits
        finally:
            server._set_rows(None)
        alone = []
        for i, name in enumerate(rows):
            set_adapter(server.model, server.pm, name)
            alone.append(server.model(input_ids=input_ids[i : i + 1]).logits)
        set_adapter(server.model, server.pm, None)
    alone = torch.cat(alone)
    torch.testing.assert_close(mixed, alone, atol=1e-5, rtol=0)
    assert all((alone[i] - alone[0]).abs().max() > 1e-3 for i, name in enumerate(rows) if name)


# --------------------------------------------------------------------------------------------
# 3. the tutorial is the code
# --------------------------------------------------------------------------------------------

ROOT = Path(__file__).parent.parent
TUTORIAL = ROOT / "docs" / "writing-plugins.md"
CODE_BLOCK = re.compile(r"<!-- (?P<kind>file|excerpt): (?P<path>\S+) -->\n```\w*\n(?P<code>.*?)```\n", re.S)


def tutorial_blocks(kind):
    """``{path: code}`` of the tutorial's blocks that are a whole file (``file``) or a part of
    one (``excerpt``) of this repository."""
    return {m["path"]: m["code"] for m in CODE_BLOCK.finditer(TUTORIAL.read_text()) if m["kind"] == kind}


def test_3_every_code_block_that_names_a_file_is_that_file():
    files, excerpts = tutorial_blocks("file"), tutorial_blocks("excerpt")
    assert len(files) >= 6 and excerpts
    for path, code in files.items():
        assert (ROOT / path).read_text() == code, f"docs/writing-plugins.md: the block of {path} differs from the file"
    for path, code in excerpts.items():
        assert code in (ROOT / path).read_text(), f"docs/writing-plugins.md: the excerpt of {path} is not in the file"


@pytest.fixture
def tutorial_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "tutorial"))


def test_3_the_local_plugin_and_its_test_run(tutorial_on_path, tiny_model_dir, tiny_data, tmp_path):
    from test_my_plugin import test_my_plugin

    test_my_plugin(tiny_model_dir, tiny_data, tmp_path)


def test_3_the_config_section_trains_with_momentum_and_validates(tutorial_on_path, run_overrides):
    import torch
    from ftengine.build import build, configure
    from ftengine.errors import ConfigError

    config, pm = configure(None, ["lora", "my_plugins.sgd_momentum"], [*run_overrides, "sgd.momentum=0.9"])
    model, _, info = build(config, pm)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = pm.hook.ftengine_make_optimizer(model=model, params=params, config=config)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    with pytest.raises(ConfigError, match="sgd.momentum: not supported with qlora; set it to 0"):
        configure(None, ["lora", "qlora", "my_plugins.sgd_momentum"], [*run_overrides, "sgd.momentum=0.9"])


def test_3_the_published_package_is_selected_by_its_entry_point_name():
    pytest.importorskip("ftengine_neftune", reason="pip install -e examples/neftune_plugin (make install does)")
    assert "neftune" in active_names(select_plugins(["neftune"]))


def test_3_the_adapter_method_tutorial_is_the_ia3_package():
    package = ROOT / "tests" / "ia3_plugin"
    files = {str(p.relative_to(ROOT)) for p in package.rglob("*") if p.suffix in (".py", ".toml")}
    blocks = tutorial_blocks("file")
    assert files <= set(blocks), f"files of the package the tutorial does not show: {sorted(files - set(blocks))}"


def test_3_the_tutorial_method_fits_the_protocol_and_one_without_a_member_does_not():
    ftengine_ia3 = pytest.importorskip("ftengine_ia3", reason="pip install -e tests/ia3_plugin (make install does)")
    assert check_method(ftengine_ia3.IA3Method(), "ia3") == []
    members = {k: v for k, v in vars(ftengine_ia3.IA3Method).items() if k != "unmerge"}
    assert check_method(type("IA3Method", (), members)(), "ia3") == [
        "plugin 'ia3': adapter method IA3Method has no member 'unmerge': add unmerge(self, model) (see ftengine.AdapterMethod)"
    ]
