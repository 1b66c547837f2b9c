"""AntiPaSTO-arrow — "arrowhead" core on the frozen top-r SVD basis: a dense b×b block on the
first b kept directions, the bounded diagonal gain of antipasto on the other r − b.
Paper: https://arxiv.org/abs/2601.07473 (AntiPaSTO family).

    y' = x W_resᵀ + b + x (U C diag(S) Vh)ᵀ,   C = blockdiag(I_b + coeff · M, diag(φ(coeff · g̃)))
    φ(z) = 1 + ELU(z),   M (b, b) and g (r − b) trainable, init 0  =>  C = I at init.

With rewrite_base=False (the default) the hook adds only U (C − I) diag(S) Vh on the untouched base.
The block sits on S-scaled coordinates and is not bounded (a step in M moves W by O(S)). After
group_init the block covers the b largest-S of the *selected* directions (they are stored in
descending-S order), not the b best-scoring ones.
"""
from dataclasses import dataclass

import lora_lite as ll

from .antipasto import AntiPaSTOConfig, gain
from .basis import GAIN_TRAIN_DEFAULTS, SVDBasisVariant, project


@dataclass
class AntiPaSTOArrowConfig(AntiPaSTOConfig):
    """coeff scales both M and g (0 = identity); suppress_only bounds the tail gains in (0, 1]
    (the block is not affected)."""

    variant: str = "antipasto_arrow"
    block: int = ll.knob(8, "[1, inf)")  # b: size of the dense block, 1 <= b < r

    def validate(self):
        super().validate()
        ll.check(self.block < self.r, "block", self.block, f"an integer with 1 <= block < r = {self.r}")


class AntiPaSTOArrow(SVDBasisVariant):
    name = "antipasto_arrow"
    config = AntiPaSTOArrowConfig
    train_defaults = dict(GAIN_TRAIN_DEFAULTS)

    def added_macs(target, cfg):
        return cfg.r * (target.d_in + target.d_out) + cfg.block ** 2, 0

    def trainable_specs(d_in, d_out, cfg):
        return {"lora_M": ll.ParamSpec((cfg.block, cfg.block), init="zeros"),
                "lora_g": ll.ParamSpec((cfg.r - cfg.block,), init="zeros")}

    def forward(layer, x, y, cfg):
        cfg, b = cfg, cfg.block
        h = project(layer, x) * layer.lora_S                  # (..., r) S-scaled coordinates
        top = cfg.coeff * (h[..., :b] @ layer.lora_M.T)     # h_top (coeff M)ᵀ, (..., b)
        if cfg.rewrite_base:
            top = top + h[..., :b]                           # h_top (I + coeff M)ᵀ
        tail = h[..., b:] * gain(layer.lora_g, cfg)          # φ (or φ − 1), (..., r - b)
        delta = top @ layer.lora_U[:, :b].T + tail @ layer.lora_U[:, b:].T
        return y + delta.to(y.dtype)
