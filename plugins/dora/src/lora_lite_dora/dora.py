"""DoRA — Liu et al. 2024, https://arxiv.org/abs/2402.09353

    g = m / sg(‖W + s·sg(B A)‖_row),   y' = y + (g − 1)·(y − b) + g·s·(x Aᵀ) Bᵀ,   s = alpha / r
    (= g ⊙ (x (W + s·B A)ᵀ) + b: the bias passes unscaled, as in PEFT's use_dora=True)

A (r, d_in) kaiming-uniform, B (d_out, r) zeros, m (d_out) = ‖W‖_row (the L2 norm of each output
row over d_in). At init B = 0 and m is computed by the same function as the norm in the forward,
so g = 1 exactly and the output is bit for bit the base's. The norm is detached (paper §4.3).

W is the dense weight (dequantized on bitsandbytes 4bit/8bit bases). The base is frozen, so it is
read once at attach into ``lora_weight_cache``, a non-persistent buffer: it follows the model
across devices, is never saved, is not in the state_dict (detach stays bit-exact) and spares a
dequantization per forward. ``cache_weight=False`` trades that memory (d_out·d_in per target, in
cfg.dtype) for a read through ll.dense_weight on every forward, which never mutates the layer
(safe on 8bit layers that have already run).
"""
from dataclasses import dataclass

import torch

import lora_lite as ll


@dataclass
class DoRAConfig(ll.AdapterConfig):
    variant: str = "dora"
    cache_weight: bool = True   # keep the dense base weight (cfg.dtype) instead of re-reading it

    def validate(self):
        super().validate()
        ll.check(isinstance(self.cache_weight, bool), "cache_weight", self.cache_weight,
                 "True or False")


def dense_base(layer):
    """The frozen base weight W, (d_out, d_in) in cfg.dtype."""
    if hasattr(layer, "lora_weight_cache"):
        return layer.lora_weight_cache
    return ll.dense_weight(layer).to(layer._lora_cfg.dtype)


def row_norm(layer):
    """sg(‖W + s·B A‖_row), (d_out,): computed in fp32, returned in the dtype of m."""
    with torch.no_grad():
        BA = layer.lora_B.float() @ layer.lora_A.float()             # (d_out, d_in)
        V = dense_base(layer).float() + layer._lora_cfg.scale * BA
        return torch.linalg.norm(V, dim=1).to(layer.lora_m.dtype)


class DoRA(ll.Variant):
    name = "dora"
    config = DoRAConfig
    paper = "https://arxiv.org/abs/2402.09353"
    train_defaults = {"lr": 2e-3}
    cost_note = ("B·A (d_out·r·d_in) once per call, spread over the batch's tokens; "
                 "the row norms are elementwise")
    peft_cost_note = "PEFT's DoRA also forms B·A (and W + s·B·A) once per call"

    @staticmethod
    def added_macs(target, cfg):
        # the LoRA path per token, and B·A once per call for the norm of W + s·B·A
        return cfg.r * (target.d_in + target.d_out), target.d_out * cfg.r * target.d_in

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        specs = {
            "lora_A": ll.ParamSpec((cfg.r, d_in), init="kaiming"),
            "lora_B": ll.ParamSpec((d_out, cfg.r), init="zeros"),
            "lora_m": ll.ParamSpec((d_out,), init="ones"),   # set to ‖W‖_row by init
        }
        if cfg.cache_weight:
            specs["lora_weight_cache"] = ll.ParamSpec((d_out, d_in), trainable=False,
                                                      persistent=False)
        return specs

    @staticmethod
    def init(layer, cfg):
        with torch.no_grad():
            if cfg.cache_weight:
                layer.lora_weight_cache.copy_(ll.dense_weight(layer))
            layer.lora_m.copy_(row_norm(layer))   # B = 0 here, so this is ‖W‖_row

    @staticmethod
    def forward(layer, x, y):
        # x: (..., d_in) in cfg.dtype; y: (..., d_out) base output in the layer's dtype
        g = layer.lora_m / row_norm(layer)                            # (d_out,), grad to m only
        bias = getattr(layer, "bias", None)
        base = (y if bias is None else y - bias).to(x.dtype)          # x Wᵀ, (..., d_out)
        lora = (x @ layer.lora_A.T) @ layer.lora_B.T                   # (..., d_out)
        return y + ((g - 1) * base + g * layer._lora_cfg.scale * lora).to(y.dtype)
