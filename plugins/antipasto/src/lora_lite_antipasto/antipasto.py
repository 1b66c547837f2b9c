"""AntiPaSTO — bounded diagonal gain on the frozen top-r SVD basis.
Paper: https://arxiv.org/abs/2601.07473 (code: github.com/wassname/AntiPaSTO).

    W = W_res + U diag(S) Vh   (SVD crop, see basis.py)
    y' = x W_resᵀ + b + ((x Vhᵀ) ⊙ S ⊙ φ(coeff · g̃)) Uᵀ,   φ(z) = 1 + ELU(z),
    g̃ = min(g, 0) if suppress_only else g,   g (r) trainable, init 0.

φ is e^z for z ≤ 0 (attenuation, bounded in (0, 1]) and 1 + z above (linear amplification), C¹ at
0 with φ(0) = 1: at g = 0 (or coeff = 0) the layer computes W exactly, up to rounding.
With rewrite_base=False (default): y' = y + ((x Vhᵀ) ⊙ S ⊙ (φ − 1)) Uᵀ on the untouched base (bit-exact at 0).
"""
from dataclasses import dataclass

import torch.nn.functional as F

import lora_lite as ll

from .basis import GAIN_TRAIN_DEFAULTS, SVDBasisConfig, SVDBasisVariant, expand, project


@dataclass
class AntiPaSTOConfig(SVDBasisConfig):
    variant: str = "antipasto"
    coeff: float = 1.0            # runtime steering scalar: 0 = identity, < 0 swaps the sign of g
    suppress_only: bool = False   # clamp g at <= 0: gains in (0, 1] (for coeff >= 0)


def gain(g, cfg):
    """φ(coeff · g̃) = 1 + ELU(coeff · g̃) (always > 0), or φ − 1 = ELU(..) if the base is kept."""
    g = g.clamp(max=0.0) if cfg.suppress_only else g  # clamp passes the gradient at g = 0
    change = F.elu(cfg.coeff * g)
    return 1.0 + change if cfg.rewrite_base else change


class AntiPaSTO(SVDBasisVariant):
    name = "antipasto"
    config = AntiPaSTOConfig
    train_defaults = dict(GAIN_TRAIN_DEFAULTS)

    def added_macs(target, cfg):
        return cfg.r * (target.d_in + target.d_out), 0

    def trainable_specs(d_in, d_out, cfg):
        return {"lora_g": ll.ParamSpec((cfg.r,), init="zeros")}

    def forward(layer, x, y, cfg):
        h = project(layer, x) * (layer.lora_S * gain(layer.lora_g, cfg))  # (..., r)
        return y + expand(layer, h).to(y.dtype)                           # (..., d_out)
