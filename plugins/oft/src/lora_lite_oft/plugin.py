import lora_lite as ll

from .boft import BOFT
from .oft import OFT


@ll.hookimpl
def register_variants(register):
    register(OFT)
    register(BOFT)
