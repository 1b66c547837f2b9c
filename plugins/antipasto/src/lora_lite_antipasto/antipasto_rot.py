"""AntiPaSTO-rot — singular-value deltas plus a block-Cayley rotation of the frozen top-r SVD
basis (the original AntiPaSTO adapter). Paper: https://arxiv.org/abs/2601.07473.

    y' = x W_resᵀ + b + ((x Vh_effᵀ) ⊙ (S + δ)) U_effᵀ,
    Vh_eff = R_bd Vh (rotate_basis V),  U_eff = U R_bdᵀ (U),  both (two rotations),  none,
    R_bd = blockdiag(R_1..R_{r/bs}),  R_k = (I − X_k)⁻¹(I + X_k),  X_k = K_k / 2,
    K_k = a·tanh(½(T_k − T_kᵀ) / a),  a = 2 tan(max_rotation_angle / 2),  T_k strict upper triangle.

δ (r) and the rotation parameters (r/bs, bs(bs−1)/2) start at exactly 0, so R = I and the layer
computes W exactly (up to rounding). Upstream started δ at 4e-4 + N(0, 4e-4) to "break sign
symmetry", which made init only near-identity; no symmetry needs breaking here: at 0 the
gradients of δ and of the rotation are both non-zero (tested). R_bd is applied block-wise to the
r coordinates, never materialised as r×r; each R_k is exactly orthogonal with det +1.
With rewrite_base=False (the default) the hook adds U_eff diag(S + δ) Vh_eff − U diag(S) Vh on the untouched base.
"""
import math
from dataclasses import dataclass

import torch

import lora_lite as ll

from .basis import ACT_POOLS, GAIN_TRAIN_DEFAULTS, SVDBasisConfig, SVDBasisVariant, expand, project

ROTATE_BASES = ("V", "U", "both", "none")


@dataclass
class AntiPaSTORotConfig(SVDBasisConfig):
    variant: str = "antipasto_rot"
    block_size: int = 4               # bs: rotation block size, 2 <= bs, bs divides r
    max_rotation_angle: float = 0.5   # soft bound (radians) on each block's rotation
    rotate_basis: str = ll.knob("V", choices=ROTATE_BASES)  # V (input basis), U (output), both, none
    act_pool: str = ll.knob("mean_abs", choices=ACT_POOLS)  # upstream's rot pooled mean |x·v|

    def validate(self):
        super().validate()
        if self.rotate_basis != "none":  # the rotation's knobs matter only with a rotation
            bs = self.block_size
            ll.check(2 <= bs <= self.r and self.r % bs == 0, "block_size", bs,
                     f"an integer >= 2 that divides r = {self.r} (rotate_basis='none' for no rotation)")
            ll.check(0 < self.max_rotation_angle < math.pi, "max_rotation_angle",
                     self.max_rotation_angle, "an angle in radians in (0, pi)")


def cayley_blocks(params, cfg):
    """(n_b, bs(bs-1)/2) -> (n_b, bs, bs) orthogonal blocks, computed in fp32."""
    bs = cfg.block_size
    rows, cols = torch.triu_indices(bs, bs, offset=1, device=params.device)
    upper = params.new_zeros((params.shape[0], bs, bs), dtype=torch.float32)
    upper[:, rows, cols] = params.float()
    skew = 0.5 * (upper - upper.transpose(-1, -2))
    bound = 2.0 * math.tan(cfg.max_rotation_angle / 2.0)
    half = 0.5 * bound * torch.tanh(skew / bound)            # X = K / 2
    eye = torch.eye(bs, device=params.device, dtype=torch.float32).expand_as(half)
    return torch.linalg.solve(eye - half, eye + half)        # (I - X)^-1 (I + X)


def rotate_coords(h, blocks, transpose):
    """Apply R_bd block-wise to coordinates h (..., r): h R_bdᵀ, or h R_bd if ``transpose``."""
    n_b, bs, _ = blocks.shape
    hb = h.reshape(*h.shape[:-1], n_b, bs)
    blocks = blocks.to(h.dtype)
    out = torch.einsum("...ni,nij->...nj", hb, blocks) if transpose else \
        torch.einsum("...nj,nij->...ni", hb, blocks)
    return out.reshape(h.shape)


class AntiPaSTORot(SVDBasisVariant):
    name = "antipasto_rot"
    config = AntiPaSTORotConfig
    train_defaults = dict(GAIN_TRAIN_DEFAULTS)
    cost_note = "the Cayley solves (once per call) are linear solves, not counted"

    def added_macs(target, cfg):
        sides = {"none": 0, "V": 1, "U": 1, "both": 2}.get(cfg.rotate_basis, 1)
        # the low-rank path, plus block rotations on the r coordinates
        return cfg.r * (target.d_in + target.d_out) + sides * cfg.r * cfg.block_size, 0

    def trainable_specs(d_in, d_out, cfg):
        specs = {"lora_delta_s": ll.ParamSpec((cfg.r,), init="zeros")}
        if cfg.rotate_basis != "none":
            n_blocks, n_angles = cfg.r // cfg.block_size, cfg.block_size * (cfg.block_size - 1) // 2
            specs["lora_rot_T"] = ll.ParamSpec((n_blocks, n_angles), init="zeros")
            if cfg.rotate_basis == "both":
                specs["lora_rot_T_u"] = ll.ParamSpec((n_blocks, n_angles), init="zeros")
        return specs

    def forward(layer, x, y, cfg):
        p0 = project(layer, x)                                             # (..., r)
        p = p0
        if cfg.rotate_basis in ("V", "both"):
            p = rotate_coords(p, cayley_blocks(layer.lora_rot_T, cfg), transpose=False)  # x (R Vh)ᵀ
        h = p * (layer.lora_S + layer.lora_delta_s)
        if cfg.rotate_basis in ("U", "both"):
            params = layer.lora_rot_T_u if cfg.rotate_basis == "both" else layer.lora_rot_T
            h = rotate_coords(h, cayley_blocks(params, cfg), transpose=True)             # (U Rᵀ)ᵀ
        if not cfg.rewrite_base:
            h = h - p0 * layer.lora_S                  # only the change; exactly 0 at init
        return y + expand(layer, h).to(y.dtype)
