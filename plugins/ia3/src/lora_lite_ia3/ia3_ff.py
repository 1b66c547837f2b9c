"""IA3, input gate (feed-forward placement) — Liu et al. 2022, https://arxiv.org/abs/2205.05638

    x' = x ⊙ g,   y' = (x ⊙ g) Wᵀ + b,   g (d_in) = 1 at init      (an input pre-hook)

The bias is not scaled, as in PEFT's IA3 on a layer listed in feedforward_modules (PEFT's ia3_l
(1, d_in) = g). g = 1 makes init exactly the identity. r and alpha are unused. Intended target:
down_proj, whose input is act(gate)·up (the default target_names).
"""
from dataclasses import dataclass
from typing import ClassVar

import lora_lite as ll


@dataclass
class IA3FFConfig(ll.AdapterConfig):
    variant: str = "ia3_ff"
    target_names: tuple = (r"down_proj$",)

    uses_rank: ClassVar[bool] = False


class IA3FF(ll.Variant):
    name = "ia3_ff"
    config = IA3FFConfig
    paper = "https://arxiv.org/abs/2205.05638"
    train_defaults = {"lr": 2e-2, "targets": (r"down_proj$",)}
    cost_note = "elementwise gain only (d_in mults/token): no matmul"
    peft_cost_note = "elementwise gain only"

    @staticmethod
    def added_macs(target, cfg):
        return 0, 0

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_g": ll.ParamSpec((d_in,), init="ones")}

    @staticmethod
    def forward_input(layer, x):
        # x: (..., d_in) in cfg.dtype; lora_g: (d_in,)
        return x * layer.lora_g.to(x.dtype)
