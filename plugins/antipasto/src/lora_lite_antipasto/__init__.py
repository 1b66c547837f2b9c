"""The AntiPaSTO family for lora-lite (found through the ``lora_lite`` entry point
``lora_lite_antipasto.plugin``): ``antipasto``, ``antipasto_rot``, ``antipasto_arrow``."""
from .basis import residual_error

__all__ = ["residual_error"]
