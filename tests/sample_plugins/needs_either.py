"""A plugin that requires one of two plugins."""

requires = (("full", "lorax"),)
