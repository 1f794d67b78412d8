"""NEFTune (Jain et al. 2023): uniform noise on the input embeddings while training.

An example of a third-party ftengine plugin published as its own package: it declares a
config section, validates it, and hooks the training start to add a forward hook on the
input embeddings. Install it (``pip install -e examples/neftune_plugin``), then
``ftengine run job.yaml --plugin lora --plugin neftune -o neftune.alpha=5``.
"""

import math

import torch
from ftengine import hookimpl
from ftengine.config import Section
from pydantic import Field

__version__ = "0.1.0"


class NeftuneOptions(Section):
    alpha: float = Field(5.0, gt=0, description="noise scale; the noise bound is alpha / sqrt(length * dim)")


@hookimpl
def ftengine_config_section(register):
    register("neftune", NeftuneOptions)


def add_noise(module, inputs, output, alpha):
    """Forward hook: during training, add U(-b, b) noise with b = alpha / sqrt(L * d)."""
    if not module.training:
        return output
    length, dim = output.shape[-2], output.shape[-1]
    bound = alpha / math.sqrt(length * dim)
    return output + torch.empty_like(output).uniform_(-bound, bound)


@hookimpl
def ftengine_on_train_start(model, state):
    alpha = state.config.neftune.alpha
    embeddings = model.get_input_embeddings()
    state.plugin_data["neftune"] = embeddings.register_forward_hook(lambda m, i, o: add_noise(m, i, o, alpha))


@hookimpl
def ftengine_on_train_end(model, state):
    state.plugin_data.pop("neftune").remove()
