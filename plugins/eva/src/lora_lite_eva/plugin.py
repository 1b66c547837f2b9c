import lora_lite as ll

from .eva import EVA


@ll.hookimpl
def register_variants(register):
    register(EVA)
