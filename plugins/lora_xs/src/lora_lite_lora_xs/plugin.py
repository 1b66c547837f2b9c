import lora_lite as ll

from .lora_xs import LoRAXS


@ll.hookimpl
def register_variants(register):
    register(LoRAXS)
