import lora_lite as ll

from .road import RoAd


@ll.hookimpl
def register_variants(register):
    register(RoAd)
