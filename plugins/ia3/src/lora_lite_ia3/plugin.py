import lora_lite as ll

from .ia3 import IA3
from .ia3_ff import IA3FF


@ll.hookimpl
def register_variants(register):
    register(IA3)
    register(IA3FF)
