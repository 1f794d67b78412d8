"""Plugins used by the tests, selected as local modules (``--plugin sample_plugins.sgd``)."""
