import lora_lite as ll

from .antipasto import AntiPaSTO
from .antipasto_ablate import AntiPaSTOAblate
from .antipasto_arrow import AntiPaSTOArrow
from .antipasto_asvd import AntiPaSTOASVD
from .antipasto_corda import AntiPaSTOCorDA
from .antipasto_dplr import AntiPaSTODPLR
from .antipasto_rot import AntiPaSTORot


@ll.hookimpl
def register_variants(register):
    register(AntiPaSTO)
    register(AntiPaSTORot)
    register(AntiPaSTOArrow)
    register(AntiPaSTOCorDA)
    register(AntiPaSTOASVD)
    register(AntiPaSTOAblate)
    register(AntiPaSTODPLR)
