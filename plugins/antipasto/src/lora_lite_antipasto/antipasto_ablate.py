"""AntiPaSTO-ablate — learned, contractive directional ablation on the frozen top-r SVD basis.
Directional ablation: Arditi et al. 2024, https://arxiv.org/abs/2406.11717 (AntiPaSTO family).

    h = (x Vhᵀ) ⊙ S (r),   Ĉ = orthonormal columns of c (r, k),   a = clamp(alpha, 0, 1) (k)
    h ← h − coeff·((h Ĉ) ⊙ a) Ĉᵀ,   y' = y_res + h Uᵀ      (rewrite_base=True)
    y' = y − coeff·(((h Ĉ) ⊙ a) Ĉᵀ) Uᵀ                      (rewrite_base=False, the default)

The core I − coeff·Ĉ diag(a) Ĉᵀ has eigenvalues in [0, 1] for coeff ∈ [0, 1]: it can only
remove (a fraction a of) k learned directions of the top-r output, never amplify (coeff < 0 adds
them back; coeff is not clamped). Ĉ: c normalised (k = 1) or its reduced QR (k > 1), recomputed
every forward in fp32. c (r, k) ~ N(0, 1/r); alpha (k) = init_alpha.

Not the identity at init, deliberately: with init_alpha = 0.05 the output moves by 5 % of the
top-r output's component along a random direction, so c gets a gradient from the first step.
init_alpha = 0 or coeff = 0 is the exact identity (alpha then trains first, c once a > 0; a
direction whose alpha is pushed below 0 stays off, as the clamp passes no gradient there).
``cov_orient`` with calibration data orients the basis by the input covariance (as
antipasto_corda, full C, no padding mask), storing the projector P in the ``lora_Vh`` slot.
Intended targets: residual writers (down_proj, o_proj).
"""
from dataclasses import dataclass

import torch

import lora_lite as ll

from .antipasto_corda import full_orientation, oriented_factors
from .basis import SVDBasisConfig, SVDBasisVariant, expand, project, set_factors


@dataclass
class AblateConfig(SVDBasisConfig):
    variant: str = "antipasto_ablate"
    k: int = ll.knob(1, "[1, inf)")              # number of ablated directions (k <= r)
    init_alpha: float = ll.knob(0.05, "[0, 1]")  # initial ablation strength
    coeff: float = 1.0
    cov_orient: bool = False      # orient the basis by the input covariance (needs calibration)
    cov_eps: float = 1e-3
    rewrite_base: bool = False

    def validate(self):
        super().validate()
        ll.check(self.k <= self.r, "k", self.k, f"an integer with 0 < k <= r = {self.r}")


def normal_over_r(t, generator):
    t.normal_(0.0, t.shape[0] ** -0.5, generator=generator)


def orthonormal(c):
    """(r, k) -> orthonormal columns, fp32 (normalised if k = 1, reduced QR otherwise)."""
    c = c.float()
    if c.shape[1] == 1:
        return c / c.norm().clamp_min(1e-12)
    return torch.linalg.qr(c, mode="reduced").Q


def removed(layer, h, cfg):
    """coeff·((h Ĉ) ⊙ a) Ĉᵀ for S-scaled coordinates h (..., r)."""
    C = orthonormal(layer.lora_c).to(h.dtype)
    a = layer.lora_alpha.clamp(0.0, 1.0)
    return cfg.coeff * (((h @ C) * a) @ C.T)


class AntiPaSTOAblate(SVDBasisVariant):
    name = "antipasto_ablate"
    config = AblateConfig
    paper = "https://arxiv.org/abs/2406.11717"
    train_defaults = {"lr": 5e-3, "alpha": "r"}
    cost_note = "LoRA-like thin matmuls at rank r plus 2·r·k MACs/token; the QR (k > 1) per call"

    def trainable_specs(d_in, d_out, cfg):
        return {"lora_c": ll.ParamSpec((cfg.r, cfg.k), init=normal_over_r),
                "lora_alpha": ll.ParamSpec((cfg.k,), init=lambda t, g: t.fill_(cfg.init_alpha))}

    @classmethod
    def group_init(cls, model, targets, cfg, calibration_data):
        if not cfg.cov_orient or calibration_data is None:
            return
        from .antipasto_corda import input_moments
        moments, counts = input_moments(model, targets, calibration_data, diagonal=False)
        for t in targets:
            sqrt_c, inv_sqrt_c = full_orientation(moments[t.name], counts[t.name], cfg.cov_eps)
            U, S, P = oriented_factors(ll.base_dense_weight(t.layer).cpu(), cfg.r, sqrt_c, inv_sqrt_c)
            device = t.layer.lora_U.device
            set_factors(t.layer, cfg, U.to(device), S.to(device), P.to(device))

    def forward(layer, x, y, cfg):
        h = project(layer, x) * layer.lora_S                          # (..., r)
        delta = -removed(layer, h, cfg)
        if cfg.rewrite_base:
            delta = h + delta
        return y + expand(layer, delta).to(y.dtype)

    def added_macs(target, cfg):
        return cfg.r * (target.d_in + target.d_out) + 2 * cfg.r * cfg.k, 0

    def merged_weight(layer, cfg):
        W = ll.dense_weight(layer)
        with torch.no_grad():
            C = orthonormal(layer.lora_c)
            a = layer.lora_alpha.float().clamp(0.0, 1.0)
            core = -cfg.coeff * (C * a) @ C.T                          # (r, r), symmetric
            if cfg.rewrite_base:
                core = core + torch.eye(cfg.r)
            delta = layer.lora_U.float() @ core @ (layer.lora_S.float()[:, None] * layer.lora_Vh.float())
        return W + delta, None

    def peft_config(cfg, target_names):
        return None
