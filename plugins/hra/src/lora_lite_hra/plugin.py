import lora_lite as ll

from .hra import HRA


@ll.hookimpl
def register_variants(register):
    register(HRA)
