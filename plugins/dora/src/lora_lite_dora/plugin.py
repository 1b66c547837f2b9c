import lora_lite as ll

from .dora import DoRA


@ll.hookimpl
def register_variants(register):
    register(DoRA)
