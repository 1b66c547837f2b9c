"""LoRA — Hu et al. 2021, https://arxiv.org/abs/2106.09685

    y' = y + s · (x Aᵀ) Bᵀ,   s = alpha / r,   A (r, d_in) kaiming-uniform,  B (d_out, r) = 0

B = 0 makes the adapter exactly the identity at init. Same parameterisation as PEFT's LoRA
(lora_A.weight = A, lora_B.weight = B, scaling = alpha / r), no dropout, no rsLoRA.
"""
from dataclasses import dataclass

import lora_lite as ll


@dataclass
class LoRAConfig(ll.AdapterConfig):
    variant: str = "lora"


class LoRA(ll.Variant):
    name = "lora"
    config = LoRAConfig
    paper = "https://arxiv.org/abs/2106.09685"
    train_defaults = {"lr": 2e-3}

    @staticmethod
    def added_macs(target, cfg):
        # x Aᵀ (r·d_in) then · Bᵀ (d_out·r), per token
        return cfg.r * (target.d_in + target.d_out), 0

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {
            "lora_A": ll.ParamSpec((cfg.r, d_in), init="kaiming"),
            "lora_B": ll.ParamSpec((d_out, cfg.r), init="zeros"),
        }

    @staticmethod
    def forward(layer, x, y):
        # x: (..., d_in) in cfg.dtype; y: (..., d_out) base output
        delta = (x @ layer.lora_A.T) @ layer.lora_B.T  # (..., d_out)
        return y + layer._lora_cfg.scale * delta.to(y.dtype)
