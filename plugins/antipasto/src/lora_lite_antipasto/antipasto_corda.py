"""AntiPaSTO-CorDA — antipasto's bounded diagonal gain on a covariance-oriented basis.
CorDA: Yang et al. 2024, https://arxiv.org/abs/2406.05223 (AntiPaSTO family, arXiv 2601.07473).

    C = E[x xᵀ] (calibration inputs, padding masked),  λ ← max(λ, 0) + cov_eps
    U, S, Ṽh = SVD(W C^{½}),   P = Ṽh_r C^{−½}   (r, d_in): an oblique input projector
    y' = y + ((x Pᵀ) ⊙ S ⊙ (φ(coeff·g̃) − 1)) Uᵀ,   φ(z) = 1 + ELU(z),  g (r) trainable, init 0

(rewrite_base=False, the default: W is kept, the hook adds only the change; exact identity at
g = 0 on every base). With rewrite_base=True the base becomes W_res = W − U_r S_r P_r (computed
from the factors as stored, cast first) and the hook adds (x Pᵀ) ⊙ S ⊙ φ. SVD(W C^{½}) is the
best rank-r fit of W under x ~ N(0, C) and equals PEFT's Cholesky form SVD(W L) (same U_r, S_r,
projector); CorDA's IPM mode (keep the top r). Calibration data is required (the moments are
accumulated on the CPU in fp32, d_in × d_in per target; the eigendecomposition is O(d_in³)).
Before group_init (and on load) P is the plain SVD's Vh_r, so the adapter is always valid.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import lora_lite as ll

from .antipasto import AntiPaSTOConfig, gain
from .basis import SVDBasisVariant, reset_trainable, set_factors, thin_svd


@dataclass
class CorDAConfig(AntiPaSTOConfig):
    variant: str = "antipasto_corda"
    cov_eps: float = ll.knob(1e-3, "(0, inf)")
    rewrite_base: bool = False


def input_moments(model, targets, calibration_data, diagonal):
    """name -> (Σ x xᵀ (d_in, d_in) or Σ x² (d_in,), token count), CPU fp32, padding masked."""
    sums = {t.name: None for t in targets}
    counts = {t.name: 0 for t in targets}

    def on_rows(target, rows):
        rows = rows.float().cpu()
        m = rows.square().sum(0) if diagonal else rows.T @ rows
        sums[target.name] = m if sums[target.name] is None else sums[target.name] + m
        counts[target.name] += rows.shape[0]

    ll.stream_inputs(model, targets, calibration_data, on_rows)
    return sums, counts


def oriented_factors(W, r, sqrt_c, inv_sqrt_c):
    """U_r, S_r, P_r from SVD(W C^{½}); sqrt_c is C^{½} (d_in, d_in) or √c (d_in,) (diagonal)."""
    scaled = W * sqrt_c if sqrt_c.dim() == 1 else W @ sqrt_c
    U, S, Vh = torch.linalg.svd(scaled, full_matrices=False)
    P = Vh[:r] * inv_sqrt_c if inv_sqrt_c.dim() == 1 else Vh[:r] @ inv_sqrt_c
    return U[:, :r], S[:r], P


def full_orientation(moment, count, eps):
    C = moment / count
    lam, Q = torch.linalg.eigh(C)
    lam = lam.clamp_min(0) + eps
    return (Q * lam.sqrt()) @ Q.T, (Q * lam.rsqrt()) @ Q.T


def diagonal_orientation(moment, count, eps):
    c = (moment / count).clamp_min(0) + eps
    return c.sqrt(), c.rsqrt()


class AntiPaSTOCorDA(SVDBasisVariant):
    name = "antipasto_corda"
    config = CorDAConfig
    paper = "https://arxiv.org/abs/2406.05223"
    needs_calibration = True
    diagonal = False
    train_defaults = {"lr": 5e-3, "alpha": "r", "calibration": 16}
    cost_note = "(x Pᵀ) and the expansion through U: r·(d_in + d_out) MACs/token, like LoRA at rank r"
    right_factor = "lora_P"  # the oblique projector (r, d_in): U, S, P in the file

    def trainable_specs(d_in, d_out, cfg):
        return {"lora_g": ll.ParamSpec((cfg.r,), init="zeros")}

    @classmethod
    def init(cls, layer, cfg):
        U, S, Vh = thin_svd(layer)                                # plain crop: P = Vh_r
        set_factors(layer, cfg, U[:, :cfg.r], S[:cfg.r], Vh[:cfg.r], cls.right_factor)

    @classmethod
    def group_init(cls, model, targets, cfg, calibration_data):
        if calibration_data is None:
            raise ValueError(f"{cls.name} orients its basis by the inputs' covariance: pass "
                             "calibration_data=[batch, ...] to ll.attach")
        moments, counts = input_moments(model, targets, calibration_data, cls.diagonal)
        orient = diagonal_orientation if cls.diagonal else full_orientation
        for t in targets:
            if counts[t.name] < cfg.r:
                raise ValueError(f"{cls.name}: {t.name} saw {counts[t.name]} calibration tokens, "
                                 f"fewer than r={cfg.r}; pass more calibration data")
            sqrt_c, inv_sqrt_c = orient(moments[t.name], counts[t.name], cfg.cov_eps)
            W = ll.base_dense_weight(t.layer).cpu()
            U, S, P = oriented_factors(W, cfg.r, sqrt_c, inv_sqrt_c)
            device = t.layer.lora_U.device
            set_factors(t.layer, cfg, U.to(device), S.to(device), P.to(device), cls.right_factor)
            reset_trainable(t.layer, cls.trainable_specs(t.d_in, t.d_out, cfg))

    def forward(layer, x, y, cfg):
        h = (x @ layer.lora_P.T) * (layer.lora_S * gain(layer.lora_g, cfg))   # (..., r)
        return y + (h @ layer.lora_U.T).to(y.dtype)                           # (..., d_out)

    def added_macs(target, cfg):
        return cfg.r * (target.d_in + target.d_out) + cfg.r, 0

    def merged_weight(layer, cfg):
        W = ll.dense_weight(layer)
        with torch.no_grad():
            g = gain(layer.lora_g.float(), cfg)
            delta = (layer.lora_U.float() * (layer.lora_S.float() * g)) @ layer.lora_P.float()
        return W + delta, None

    def peft_config(cfg, target_names):
        return None
