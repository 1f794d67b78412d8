"""A plugin written for a plugin API major version this ftengine does not implement."""

from ftengine import hookimpl

ftengine_plugin_api = 2


@hookimpl
def ftengine_on_train_end(model, state):
    return None
