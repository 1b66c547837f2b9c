"""AntiPaSTO-ASVD — CorDA's sibling oriented by the inputs' diagonal second moment.
ASVD: Yuan et al. 2023, https://arxiv.org/abs/2312.05821 (AntiPaSTO family, arXiv 2601.07473).

    c_j = E[x_j²] (calibration inputs, padding masked),  c ← max(c, 0) + cov_eps
    U, S, Ṽh = SVD(W diag(√c)),   P = Ṽh_r diag(1/√c)
    y' = y + ((x Pᵀ) ⊙ S ⊙ (φ(coeff·g̃) − 1)) Uᵀ      (rewrite_base=False, the default)

Same tensors, knobs, forward and residual handling as antipasto_corda (see there); only the
orientation differs: a column scaling, O(d_in) statistics per target instead of d_in × d_in and
no eigendecomposition. Its basis is not a sub-basis of CorDA's. Calibration data is required.
"""
from dataclasses import dataclass

from .antipasto_corda import AntiPaSTOCorDA, CorDAConfig


@dataclass
class ASVDConfig(CorDAConfig):
    variant: str = "antipasto_asvd"


class AntiPaSTOASVD(AntiPaSTOCorDA):
    name = "antipasto_asvd"
    config = ASVDConfig
    paper = "https://arxiv.org/abs/2312.05821"
    diagonal = True
