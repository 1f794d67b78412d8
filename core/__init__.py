"""ftengine: a plugin-based engine for fine-tuning pre-trained language models.

    ftengine run                                  # the embedded default job
    ftengine run job.yaml --plugin lora -o lora.r=8
    ftengine plugins                              # what is installed, which hooks each implements

Plugins implement the hooks in ``ftengine.hookspecs`` with ``@ftengine.hookimpl``.
"""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("ftengine")

__all__ = ["hookimpl", "__version__"]
