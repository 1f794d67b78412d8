"""DoRA: weight-decomposed LoRA (Liu et al. 2024, arXiv:2402.09353), a variant of ``lora``.

    ftengine run job.yaml --plugin lora --plugin dora

Each adapted weight is split into a direction and a magnitude per output row, ``m``::

    W' = m ⊙ (W + s·BA) / ‖W + s·BA‖        (‖·‖: the L2 norm of each output row)

``m`` starts at ‖W‖ (B is zero at init, so the output starts equal to the base) and trains with
A and B. The norm is recomputed in every forward, from the current A, B and base weight, and
treated as a constant in backward (detached), as in the paper (§4.3) and PEFT. The forward is
PEFT's, term for term::

    y = base(x) + (m/‖·‖ − 1) ⊙ W·x̃ + (m/‖·‖) ⊙ s·B A x̃        x̃ = dropout(x)

Without dropout, or in eval mode, ``W·x̃`` is the base output minus its bias (no second matmul).
The magnitude is ``LoraLinear.lora_magnitude_vector[name]``, saved as PEFT's
``<module>.lora_magnitude_vector``; adapter files carry ``use_dora: true``.
"""

import torch
import torch.nn.functional as F
from ftengine import hookimpl
from ftengine.plugins.lora.layer import dense_weight
from torch import nn

requires = ("lora",)


class DoraVariant:
    """The DoRA computation for one ``LoraLinear`` adapter (see ``ftengine_lora_variant``)."""

    name = "dora"
    peft_flag = "use_dora"

    @staticmethod
    def row_norm(weight, delta):
        """‖W + ΔW‖ per output row, as a constant for backward."""
        return torch.linalg.norm(weight + delta.detach(), dim=1).detach()

    def parameter_shapes(self, layer):
        return {"lora_magnitude_vector": (layer.out_features,)}

    def add(self, layer, name):
        weight = dense_weight(layer.base_layer).float()
        layer.lora_magnitude_vector[name] = nn.Parameter(self.row_norm(weight, layer.delta_weight(name)))

    def forward(self, layer, name, x, base_output):
        lora_A, lora_B, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
        scaling = layer.scaling[name]
        weight = dense_weight(layer.base_layer).to(x.dtype)
        norm = self.row_norm(weight, layer.delta_weight(name).to(x.dtype))
        scale = (layer.lora_magnitude_vector[name] / norm).view(1, -1)
        if isinstance(dropout, nn.Identity) or not layer.training:
            bias = layer.base_layer.bias
            direction_output = base_output if bias is None else base_output - bias
        else:
            # Dropout changes the input of the W term too, so W·x̃ needs its own matmul.
            x = dropout(x)
            direction_output = F.linear(x, weight)
        return base_output + (scale - 1) * direction_output + scale * lora_B(lora_A(x)) * scaling

    @torch.no_grad()
    def column_scale(self, layer, name):
        """``m / ‖W + ΔW‖`` per output column, the factor of a mixed batch's DoRA rows (computed
        once per adapter set, as the forward would in eval mode, not per forward)."""
        weight = dense_weight(layer.base_layer).float()
        return layer.lora_magnitude_vector[name] / self.row_norm(weight, layer.delta_weight(name))

    def merge(self, layer, name, weight):
        """``(m / ‖W + ΔW‖) ⊙ (W + ΔW)``; the norms are returned for ``unmerge``, which cannot
        recover them from the merged weight (its rows all have norm ``m``)."""
        dense = weight.float()
        delta = layer.delta_weight(name)
        norm = self.row_norm(dense, delta)
        factor = (layer.lora_magnitude_vector[name] / norm).view(-1, 1)
        return (factor * (dense + delta)).to(weight.dtype), norm

    def unmerge(self, layer, name, weight, norm):
        factor = (layer.lora_magnitude_vector[name] / norm).view(-1, 1)
        return (weight.float() / factor - layer.delta_weight(name)).to(weight.dtype)


DORA = DoraVariant()


@hookimpl
def ftengine_lora_variant():
    return DORA
