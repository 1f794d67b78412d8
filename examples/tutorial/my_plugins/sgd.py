import torch
from ftengine import hookimpl


@hookimpl
def ftengine_make_optimizer(model, params, config):
    return torch.optim.SGD([p for _, p in params], lr=config.train.lr)
