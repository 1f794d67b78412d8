"""bitsandbytes' PagedAdamW8bit as the optimiser, for QLoRA-style memory savings on CUDA.

    ftengine run job.yaml --plugin lora --plugin qlora --plugin paged_adamw8bit

The optimiser state is kept in 8 bits and paged to CPU memory under pressure. It uses the
default AdamW's settings (``train.lr``, ``train.weight_decay`` on matrices only). On CPU it does
not apply: the run warns and uses the default AdamW.
"""

import warnings

import torch
from ftengine import hookimpl
from ftengine.plugins.adamw import decay_groups


def _on_cuda(config):
    return config.train.device != "cpu" and torch.cuda.is_available()


@hookimpl
def ftengine_validate(config):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return ["plugin 'paged_adamw8bit' needs bitsandbytes, which is not installed: pip install bitsandbytes"]
    if not _on_cuda(config):
        warnings.warn("plugin 'paged_adamw8bit' only applies on CUDA; this CPU run uses the default AdamW", stacklevel=2)
    return []


@hookimpl
def ftengine_make_optimizer(params, config):
    if not (params and all(p.is_cuda for _, p in params)):
        return None  # the default AdamW takes over
    import bitsandbytes as bnb

    return bnb.optim.PagedAdamW8bit(decay_groups(params, config.train.weight_decay), lr=config.train.lr, betas=(0.9, 0.999))
