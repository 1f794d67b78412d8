import torch
from ftengine import hookimpl
from ftengine.config import Section
from pydantic import Field


class SgdOptions(Section):  # unknown keys and bad values are reported with the rest
    momentum: float = Field(0.0, ge=0, lt=1)


@hookimpl
def ftengine_config_section(register):
    register("sgd", SgdOptions)  # the YAML section `sgd:` and `-o sgd.momentum=0.9`


@hookimpl
def ftengine_validate(config, active):
    if config.sgd.momentum and "qlora" in active:
        return ["sgd.momentum: not supported with qlora; set it to 0"]


@hookimpl
def ftengine_make_optimizer(model, params, config):
    return torch.optim.SGD([p for _, p in params], lr=config.train.lr, momentum=config.sgd.momentum)
