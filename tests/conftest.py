import os

import pytest

# Kernels run in-process through Triton's interpreter, on CPU as on a GPU machine. Set before any
# test module can import triton: Triton fixes interpreter mode when it is first imported.
os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def run_overrides(tiny_model_dir, tiny_data, tmp_path):
    """``-o`` overrides for a short run on the tiny model and data."""
    train, evaluation = tiny_data
    return [
        f"model={tiny_model_dir}",
        f"data.train={train}",
        f"data.eval={evaluation}",
        f"output_dir={tmp_path / 'out'}",
        "train.max_steps=4",
        "train.batch_size=4",
        "train.lr=1e-3",
    ]


@pytest.fixture(autouse=True, scope="session")
def isolated_cache(tmp_path_factory):
    """Tests never read or write the user's model/data cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FTENGINE_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()
