"""IA3, output gate — Liu et al. 2022, https://arxiv.org/abs/2205.05638

    y' = y ⊙ g = (x Wᵀ + b) ⊙ g,   g (d_out) = 1 at init

The bias is scaled too, as in PEFT's IA3 on a non-feed-forward layer (IA3Config without
feedforward_modules; PEFT's ia3_l (d_out, 1) = g). g = 1 makes init exactly the identity.
r and alpha are unused. Default targets: k_proj and v_proj (the paper's placement).
"""
from dataclasses import dataclass
from typing import ClassVar

import lora_lite as ll


@dataclass
class IA3Config(ll.AdapterConfig):
    variant: str = "ia3"
    target_names: tuple = (r"k_proj$", r"v_proj$")

    uses_rank: ClassVar[bool] = False


class IA3(ll.Variant):
    name = "ia3"
    config = IA3Config
    paper = "https://arxiv.org/abs/2205.05638"
    train_defaults = {"lr": 2e-2, "targets": (r"(k_proj|v_proj)$",)}
    cost_note = "elementwise gain only (d_out mults/token): no matmul, nothing to count"
    peft_cost_note = "elementwise gain only"

    @staticmethod
    def added_macs(target, cfg):
        return 0, 0

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_g": ll.ParamSpec((d_out,), init="ones")}

    @staticmethod
    def forward(layer, x, y):
        # y: (..., d_out) base output, bias included. The product runs in the wider of y's and
        # lora_g's dtypes (type promotion, as PEFT), so g = 1 is exact on any base dtype.
        return y * layer.lora_g
