"""Built-in plugins: each module here is one plugin, selected by its module name."""
