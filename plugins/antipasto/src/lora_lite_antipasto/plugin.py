import lora_lite as ll

from .antipasto import AntiPaSTO
from .antipasto_arrow import AntiPaSTOArrow
from .antipasto_rot import AntiPaSTORot


@ll.hookimpl
def register_variants(register):
    register(AntiPaSTO)
    register(AntiPaSTORot)
    register(AntiPaSTOArrow)
