import lora_lite as ll

from .lora import LoRA


@ll.hookimpl
def register_variants(register):
    register(LoRA)
