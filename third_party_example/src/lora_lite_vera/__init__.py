"""VeRA for lora-lite, a third-party plugin (entry point ``vera = lora_lite_vera.plugin``)."""
from .vera import VeRA, VeRAConfig, projections

__all__ = ["VeRA", "VeRAConfig", "projections"]
__version__ = "0.1.0"
