"""AntiPaSTO-DPLR — diagonal gain plus a low-rank mixing core on the frozen top-r SVD basis.
AntiPaSTO family: https://arxiv.org/abs/2601.07473.

    p = x Vhᵀ (r),   h = p ⊙ S ⊙ (φ(coeff·g̃) − 1) + coeff·(p Aᵀ) Bᵀ,   y' = y + h Uᵀ

(rewrite_base=False, the default: W is kept; with rewrite_base=True the base is W_res and the
diagonal term is p ⊙ S ⊙ φ). g (r) zeros, A (k, r) kaiming, B (r, k) zeros, k = ``lora_rank``:
exact identity at init (B = 0, g = 0), and coeff = 0 is the identity too. In S-space the core
is diag(S φ) + coeff·(B A)ᵀ; the mixing term is additive, not multiplied by S, so a unit step
moves W by O(1), not O(S) (the arrow core's problem). No alpha/r scale: retune lr when
sweeping k. Optional direction re-selection with calibration data, as antipasto.
"""
from dataclasses import dataclass

import torch

import lora_lite as ll

from .antipasto import AntiPaSTOConfig, gain
from .basis import SVDBasisVariant, expand, project, reselect_directions


@dataclass
class DPLRConfig(AntiPaSTOConfig):
    variant: str = "antipasto_dplr"
    lora_rank: int = ll.knob(8, "[1, inf)")  # k: rank of the mixing core, 0 < k <= r
    rewrite_base: bool = False

    def validate(self):
        super().validate()
        ll.check(self.lora_rank <= self.r, "lora_rank", self.lora_rank,
                 f"an integer with 0 < lora_rank <= r = {self.r}")


class AntiPaSTODPLR(SVDBasisVariant):
    name = "antipasto_dplr"
    config = DPLRConfig
    train_defaults = {"lr": 5e-3, "alpha": "r"}
    cost_note = "LoRA-like thin matmuls at rank r plus 2·r·k MACs/token for the mixing core"

    def trainable_specs(d_in, d_out, cfg):
        return {"lora_g": ll.ParamSpec((cfg.r,), init="zeros"),
                "lora_A": ll.ParamSpec((cfg.lora_rank, cfg.r), init="kaiming"),
                "lora_B": ll.ParamSpec((cfg.r, cfg.lora_rank), init="zeros")}

    @classmethod
    def group_init(cls, model, targets, cfg, calibration_data):
        if calibration_data is None:
            return
        reselect_directions(model, targets, cfg, calibration_data)
        with torch.no_grad():                 # back to the identity (A keeps its random init)
            for t in targets:
                t.layer.lora_g.zero_()
                t.layer.lora_B.zero_()

    def forward(layer, x, y, cfg):
        p = project(layer, x)                                            # (..., r)
        h = p * (layer.lora_S * gain(layer.lora_g, cfg))
        h = h + cfg.coeff * ((p @ layer.lora_A.T) @ layer.lora_B.T)     # (..., r)
        return y + expand(layer, h).to(y.dtype)

    def added_macs(target, cfg):
        return cfg.r * (target.d_in + target.d_out) + 2 * cfg.r * cfg.lora_rank + cfg.r, 0

    def merged_weight(layer, cfg):
        W = ll.dense_weight(layer)
        with torch.no_grad():
            core = torch.diag(layer.lora_S.float() * gain(layer.lora_g.float(), cfg))
            core = core + cfg.coeff * (layer.lora_B.float() @ layer.lora_A.float()).T  # h = p core
            delta = layer.lora_U.float() @ core.T @ layer.lora_Vh.float()
        return W + delta, None

    def peft_config(cfg, target_names):
        return None
