"""A plugin with a misspelled hook implementation: selecting it must be an error."""

from ftengine import hookimpl


@hookimpl
def ftengine_compute_los(model, batch, state):
    return None
