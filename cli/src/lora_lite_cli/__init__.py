"""The ``lora-lite`` command line (Typer + rich)."""
from lora_lite import _installed_version

__version__ = _installed_version("lora-lite-cli")
