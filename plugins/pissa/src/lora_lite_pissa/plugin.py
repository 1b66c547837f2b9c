import lora_lite as ll

from .pissa import PiSSA


@ll.hookimpl
def register_variants(register):
    register(PiSSA)
