"""The plugins of docs/writing-plugins.md, sections 1 and 2 (tests/test_plugin_api.py runs them)."""
