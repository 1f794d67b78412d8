"""ftengine: a plugin-based engine for fine-tuning pre-trained language models.

    ftengine run                                  # the embedded default job
    ftengine run job.yaml --plugin lora -o lora.r=8
    ftengine plugins                              # what is installed, which hooks each implements

Plugins implement the hooks in ``ftengine.hookspecs`` with ``@ftengine.hookimpl``; an adapter
method is an object implementing ``ftengine.AdapterMethod``. A plugin states the major version of
the plugin API it was written for: ``ftengine_plugin_api = 1``.
"""

import pluggy

__version__ = "0.1.0"

#: The plugin API, ``(major, minor)``: a major version removes or changes hooks and members; a
#: minor one only adds, and keeps a retired hook working, with a warning, one minor version more.
PLUGIN_API = (1, 1)

hookimpl = pluggy.HookimplMarker("ftengine")

__all__ = ["AdapterMethod", "PLUGIN_API", "hookimpl", "__version__"]


def __getattr__(name):
    # ``import ftengine`` stays light (the CLI starts fast); the protocol's module imports torch.
    if name == "AdapterMethod":
        from .methods import AdapterMethod

        return AdapterMethod
    raise AttributeError(f"module 'ftengine' has no attribute {name!r}")
