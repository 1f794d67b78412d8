"""AdamW with decoupled weight decay on matrices only (default plugin).

Biases, norms and other vectors get no weight decay, as in nanoGPT/minGPT.
"""

import torch
from ftengine import hookimpl

default = True


def decay_groups(params, weight_decay):
    """Optimiser parameter groups: ``weight_decay`` on matrices, none on vectors (biases, norms,
    DoRA magnitudes); empty groups left out.

    :param params: ``[(name, parameter), ...]`` as ``ftengine_make_optimizer`` receives them.
    """
    groups = [
        {"params": [p for _, p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


@hookimpl(trylast=True)
def ftengine_make_optimizer(params, config):
    fused = all(p.is_cuda for _, p in params) and bool(params)
    return torch.optim.AdamW(
        decay_groups(params, config.train.weight_decay), lr=config.train.lr, betas=(0.9, 0.999), fused=fused or None
    )
