"""IA3, output gate — Liu et al. 2022, https://arxiv.org/abs/2205.05638

    y' = y ⊙ g = (x Wᵀ + b) ⊙ g,   g (d_out) = 1 at init

The bias is scaled too, as in PEFT's IA3 on a non-feed-forward layer (IA3Config without
feedforward_modules; PEFT's ia3_l (d_out, 1) = g). g = 1 makes init exactly the identity.
r and alpha are unused. Default targets: the key and value projections of the architecture
(placement.py; the paper's placement).

Interop: merges to W' = diag(g) W and b' = g ⊙ b (a changed bias: ``as_lora_rank`` export refuses
layers with a bias); exports to / imports from PEFT's IA3Config (ia3_l (d_out, 1)), layers not in
feedforward_modules. A PEFT IA3 folder with feed-forward layers is the ia3_ff variant's.
"""
from dataclasses import dataclass

import lora_lite as ll

from .gate import GateConfig, GateVariant, ia3_peft_config
from .placement import key_value_names


@dataclass
class IA3Config(GateConfig):
    variant: str = "ia3"


class IA3(GateVariant):
    name = "ia3"
    config = IA3Config
    cost_note = "elementwise gain only (d_out mults/token): no matmul, nothing to count"

    def default_target_names(model):
        """Per-architecture default targets (see placement.py); used when target_names=()."""
        return key_value_names(model)

    def param_specs(d_in, d_out, cfg):
        return {"lora_g": ll.ParamSpec((d_out,), init="ones")}

    def forward(layer, x, y, cfg):
        # y: (..., d_out) base output, bias included. The product runs in the wider of y's and
        # lora_g's dtypes (type promotion, as PEFT), so g = 1 is exact on any base dtype.
        return y * layer.lora_g

    def merged_weight(layer, cfg):
        g = layer.lora_g.float()                                     # (d_out,)
        bias = getattr(layer, "bias", None)
        return g[:, None] * ll.dense_weight(layer), None if bias is None else g * bias.float()

    def peft_config(cfg, target_names):
        return ia3_peft_config(target_names, feedforward=())

    def peft_state(layer, cfg):
        return {"ia3_l": layer.lora_g.reshape(-1, 1)}               # (d_out, 1)

    def from_peft(peft_config):
        if peft_config.get("peft_type") != "IA3":
            return None
        if peft_config.get("feedforward_modules"):
            return None  # feed-forward placement: the ia3_ff variant's (all layers one kind)
        return {}
