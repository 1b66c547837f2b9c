"""LoRA — Hu et al. 2021, https://arxiv.org/abs/2106.09685

    y' = y + s · (x Aᵀ) Bᵀ,   s = alpha / r,   A (r, d_in) kaiming-uniform,  B (d_out, r) = 0

B = 0 makes the adapter exactly the identity at init. Same parameterisation as PEFT's LoRA
(lora_A.weight = A, lora_B.weight = B, scaling = alpha / r), no dropout. ``use_rslora=True``
scales by alpha / √r instead (rsLoRA, PEFT's use_rslora). Merges exactly (W' = W + s·B A),
exports to and imports from PEFT as it is (rank_pattern / alpha_pattern become per-target
``overrides``).
"""
import math
from dataclasses import dataclass

import lora_lite as ll

# PEFT inits that rewrote the base weight (the adapter is relative to that): refused at import
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass
class LoRAConfig(ll.AdapterConfig):
    variant: str = "lora"
    use_rslora: bool = False    # scale alpha / sqrt(r) (rsLoRA) instead of alpha / r

    def validate(self):
        super().validate()
        ll.check(isinstance(self.use_rslora, bool), "use_rslora", self.use_rslora, "True or False")

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


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

    @staticmethod
    def merged_weight(layer, cfg):
        W = ll.dense_weight(layer)                                   # (d_out, d_in) fp32
        return W + cfg.scale * (layer.lora_B.float() @ layer.lora_A.float()), None

    # -- combining (ll.combine): read the factors, and be what a combination is made of -------
    @staticmethod
    def lowrank_factors(layer, cfg):
        return layer.lora_A, layer.lora_B, cfg.scale                 # delta = scale · B A

    @staticmethod
    def lowrank_config(rank, target_names):
        return LoRAConfig(r=rank, alpha=float(rank), target_names=tuple(target_names),
                          target_roles=())                           # unit scale, as PEFT's

    @staticmethod
    def load_lowrank(layer, cfg, A, B):
        layer.lora_A.copy_(A.to(layer.lora_A.dtype))
        layer.lora_B.copy_(B.to(layer.lora_B.dtype))

    @staticmethod
    def peft_config(cfg, target_names):
        return ll.peft_lora_config(target_names, cfg.r, cfg.alpha, use_rslora=cfg.use_rslora,
                                   **ll.peft_patterns(cfg, target_names))

    @staticmethod
    def peft_state(layer, cfg):
        return {"lora_A.weight": layer.lora_A, "lora_B.weight": layer.lora_B}

    @staticmethod
    def from_peft(peft_config):
        if peft_config.get("peft_type") != "LORA" or peft_config.get("use_dora"):
            return None
        return ll.peft_lora_fields(peft_config, holds="A and B",
                                   refused_inits=BASE_REWRITING_INITS)

    @staticmethod
    def load_peft_state(layer, cfg, tensors):
        layer.lora_A.copy_(ll.peft_tensor(tensors, "lora_A.weight", layer.lora_A.shape))
        layer.lora_B.copy_(ll.peft_tensor(tensors, "lora_B.weight", layer.lora_B.shape))
