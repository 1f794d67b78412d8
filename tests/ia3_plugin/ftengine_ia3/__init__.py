"""(IA)³ for ftengine (placeholder until the adapter hooks land)."""

__version__ = "0.1.0"
