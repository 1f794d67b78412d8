"""AdamW with decoupled weight decay on matrices only (default plugin).

Biases, norms and other vectors get no weight decay, as in nanoGPT/minGPT.
"""

import torch
from ftengine import hookimpl

default = True


@hookimpl(trylast=True)
def ftengine_make_optimizer(model, params, config):
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = all(p.is_cuda for _, p in params) and bool(params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.train.lr, betas=(0.9, 0.999), fused=fused or None)
