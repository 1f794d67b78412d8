"""Config files, overrides and validation: every problem reported at once, with where and how."""

import pytest
from ftengine.build import configure
from ftengine.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path, tiny_data):
    path = write(tmp_path, f"model: some/model\ndata:\n  train: {tiny_data[0]}\ntrain:\n  lr: 0.01\n  batch_size: 2\n")
    config, _ = configure(path, ["full"], ["train.lr=3e-4", "train.seed=7"])
    assert config.model == "some/model"
    assert config.train.lr == 3e-4 and config.train.seed == 7 and config.train.batch_size == 2
    assert config.plugins == ["full"]


def test_all_errors_at_once_with_file_line_and_suggestion(tmp_path, tiny_data):
    path = write(
        tmp_path,
        f"data:\n  train: {tiny_data[0]}\ntrain:\n  lr: -1\n  bach_size: 4\n  max_steps: 3\n  epochs: 2\nlora:\n  r: 4\n",
    )
    with pytest.raises(ConfigError) as error:
        configure(path, [], ["train.warmup_steps=many"])
    text = str(error.value)
    assert f"{path}:4: train.lr: Input should be greater than 0 (got -1)" in text
    assert f"{path}:5: train.bach_size: unknown key. Did you mean 'train.batch_size'?" in text
    assert f"{path}:7: train.epochs: set train.max_steps or train.epochs, not both" in text
    assert "-o train.warmup_steps: train.warmup_steps: Input should be a valid integer" in text
    assert f"{path}:8: lora: unknown key. It belongs to plugin 'lora': add --plugin lora, or remove the section." in text
    assert len(error.value.problems) == 5


def test_missing_training_data_is_reported():
    with pytest.raises(ConfigError, match="data.train: no training data given"):
        configure(None, ["full"], [])


def test_bad_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"job.yaml:\d+: not valid YAML"):
        configure(path)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        configure(None, [], ["train.lr"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file"):
        configure(tmp_path / "nope.yaml")
