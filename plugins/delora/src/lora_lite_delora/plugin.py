import lora_lite as ll

from .delora import DeLoRA


@ll.hookimpl
def register_variants(register):
    register(DeLoRA)
