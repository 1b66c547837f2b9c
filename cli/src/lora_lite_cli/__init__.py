"""The ``lora-lite`` command line (Typer + rich)."""
__version__ = "0.1.0"
