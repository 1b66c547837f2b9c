"""IA3, input gate (feed-forward placement) — Liu et al. 2022, https://arxiv.org/abs/2205.05638

    x' = x ⊙ g,   y' = (x ⊙ g) Wᵀ + b,   g (d_in) = 1 at init      (an input pre-hook)

The bias is not scaled, as in PEFT's IA3 on a layer listed in feedforward_modules (PEFT's ia3_l
(1, d_in) = g). g = 1 makes init exactly the identity. r and alpha are unused. Default target: the
feed-forward down projection of the architecture (down_proj, fc2, dense_4h_to_h...: placement.py),
whose input is act(gate)·up.
"""
from dataclasses import dataclass
from typing import ClassVar

import lora_lite as ll

from .placement import down_names


@dataclass
class IA3FFConfig(ll.AdapterConfig):
    variant: str = "ia3_ff"

    uses_rank: ClassVar[bool] = False


class IA3FF(ll.Variant):
    name = "ia3_ff"
    config = IA3FFConfig
    paper = "https://arxiv.org/abs/2205.05638"

    @staticmethod
    def default_target_names(model):
        """Per-architecture default targets (see placement.py); used when target_names=()."""
        return down_names(model)

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_g": ll.ParamSpec((d_in,), init="ones")}

    @staticmethod
    def forward_input(layer, x):
        # x: (..., d_in) in cfg.dtype; lora_g: (d_in,)
        return x * layer.lora_g.to(x.dtype)
