"""LoRA-XS — Bałazy et al. 2024, https://arxiv.org/abs/2405.17604 (reference: MohammadrezaBanaei/LoRA-XS)

    y' = y + s·((x Aᵀ) Rᵀ) Bᵀ,   A = diag(S_r) Vh_r (r, d_in),  B = U_r (d_out, r),  s = alpha / r

an output hook; W is neither changed nor cropped. A and B are frozen buffers from the fp32 SVD
W = U S Vh taken once at attach (the singular values folded into A, as in the reference); the
only trainable tensor is the r × r core ``lora_R``, so a target trains r² numbers whatever its
shape. R here is the transpose of the paper's row-vector R (matters only when converting
official checkpoints).

- Init: R = 0 (``init_std=0``, the default) gives the exact identity, and R still gets a
  gradient at once (dL/dR = s·Bᵀ (dL/dy)ᵀ (x Aᵀ), with A, B fixed and non-zero). The reference
  draws R ~ N(0, 1e-5²) instead (``init_std=1e-5``): identity only approximately.
- Works on bitsandbytes 4bit/8bit bases: W is read once, dequantized, for the SVD.
- The file holds A and B too (persistent buffers, r(d_in + d_out) numbers per target): an SVD's
  signs are not reproducible across LAPACK builds, so they are not recomputed on load.
- No PEFT equivalent (peft_config is None).
"""
from dataclasses import dataclass

import torch

import lora_lite as ll


@dataclass
class LoRAXSConfig(ll.AdapterConfig):
    variant: str = "lora_xs"
    alpha: float = 8.0           # = r: s = 1, the reference's setting
    init_std: float = ll.knob(0.0, "[0, inf)")  # std of R's init; 0 = exact identity (reference: 1e-5)


class LoRAXS(ll.Variant):
    name = "lora_xs"
    config = LoRAXSConfig
    paper = "https://arxiv.org/abs/2405.17604"
    train_defaults = {"lr": 1e-2, "alpha": "r"}
    cost_note = "the r×r core adds r² MACs/token between the two thin matmuls"

    def param_specs(d_in, d_out, cfg):
        if cfg.r > min(d_in, d_out):
            raise ValueError(f"lora_xs: r={cfg.r} exceeds min(d_in, d_out)={min(d_in, d_out)} "
                             "for this layer; choose a smaller r")
        return {
            "lora_A": ll.ParamSpec((cfg.r, d_in), trainable=False),    # diag(S_r) Vh_r
            "lora_B": ll.ParamSpec((d_out, cfg.r), trainable=False),   # U_r
            "lora_R": ll.ParamSpec((cfg.r, cfg.r), init="zeros"),
        }

    def init(layer, cfg):
        with torch.no_grad():
            W = ll.dense_weight(layer)                                 # (d_out, d_in) fp32
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            layer.lora_A.copy_(S[:cfg.r, None] * Vh[:cfg.r])
            layer.lora_B.copy_(U[:, :cfg.r])
            if cfg.init_std > 0:
                g = torch.Generator().manual_seed(cfg.seed)
                layer.lora_R.copy_(cfg.init_std * torch.randn(layer.lora_R.shape, generator=g))

    def forward(layer, x, y, cfg):
        # x: (..., d_in) in cfg.dtype
        h = (x @ layer.lora_A.T) @ layer.lora_R.T                      # (..., r)
        return y + (cfg.scale * (h @ layer.lora_B.T)).to(y.dtype)

    def added_macs(target, cfg):
        return cfg.r * (target.d_in + target.d_out) + cfg.r ** 2, 0

    def merged_weight(layer, cfg):
        W = ll.dense_weight(layer)
        delta = layer.lora_B.float() @ layer.lora_R.detach().float() @ layer.lora_A.float()
        return W + cfg.scale * delta, None

    def peft_config(cfg, target_names):
        return None
