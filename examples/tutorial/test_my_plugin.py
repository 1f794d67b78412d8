from ftengine.build import configure
from ftengine.loop import train


def test_my_plugin(tiny_model_dir, tiny_data, tmp_path):
    config, pm = configure(
        None,
        ["lora", "my_plugins.sgd"],
        [
            f"model={tiny_model_dir}",
            f"data.train={tiny_data[0]}",
            f"output_dir={tmp_path / 'run'}",
            "train.max_steps=4",
        ],
    )
    train(config, pm)
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
