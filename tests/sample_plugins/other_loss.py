"""Another loss plugin, to clash with second_loss."""

from ftengine import hookimpl


@hookimpl
def ftengine_compute_loss(model, batch, state):
    return None
