"""The module named by the ``lora_lite`` entry point: lora-lite calls its hook implementations."""
import lora_lite as ll

from .vera import VeRA


@ll.hookimpl
def register_variants(register):
    register(VeRA)
