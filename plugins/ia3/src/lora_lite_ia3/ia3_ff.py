"""IA3, input gate (feed-forward placement) — Liu et al. 2022, https://arxiv.org/abs/2205.05638

    x' = x ⊙ g,   y' = (x ⊙ g) Wᵀ + b,   g (d_in) = 1 at init      (an input pre-hook)

The bias is not scaled, as in PEFT's IA3 on a layer listed in feedforward_modules (PEFT's ia3_l
(1, d_in) = g). g = 1 makes init exactly the identity. r and alpha are unused. Default target: the
feed-forward down projection of the architecture (down_proj, fc2, dense_4h_to_h...: placement.py),
whose input is act(gate)·up.

Interop: merges to W' = W diag(g) (bias unchanged); exports to / imports from PEFT's IA3Config
with every target in feedforward_modules (ia3_l (1, d_in)). PEFT folders that mix feed-forward
and other IA3 layers are refused (lora-lite attaches one variant per model).
"""
from dataclasses import dataclass

import lora_lite as ll

from .gate import GateConfig, GateVariant, ia3_peft_config
from .placement import down_names


@dataclass
class IA3FFConfig(GateConfig):
    variant: str = "ia3_ff"


class IA3FF(GateVariant):
    name = "ia3_ff"
    config = IA3FFConfig
    cost_note = "elementwise gain only (d_in mults/token): no matmul"

    def default_target_names(model):
        """Per-architecture default targets (see placement.py); used when target_names=()."""
        return down_names(model)

    def param_specs(d_in, d_out, cfg):
        return {"lora_g": ll.ParamSpec((d_in,), init="ones")}

    def forward_input(layer, x, cfg):
        # x: (..., d_in) in cfg.dtype; lora_g: (d_in,)
        return x * layer.lora_g.to(x.dtype)

    def merged_weight(layer, cfg):
        return ll.dense_weight(layer) * layer.lora_g.float()[None, :], None

    def peft_config(cfg, target_names):
        return ia3_peft_config(target_names, feedforward=target_names)

    def peft_state(layer, cfg):
        return {"ia3_l": layer.lora_g.reshape(1, -1)}               # (1, d_in)

    def from_peft(peft_config):
        if peft_config.get("peft_type") != "IA3" or not peft_config.get("feedforward_modules"):
            return None
        ff, targets = peft_config["feedforward_modules"], peft_config.get("target_modules")
        if isinstance(ff, str) or isinstance(targets, str) or sorted(ff) != sorted(targets or []):
            raise ll.ConfigError(
                f"feedforward_modules={ff!r}, target_modules={targets!r}: lora-lite attaches one "
                "variant per model, so an IA3 adapter must be all feed-forward (ia3_ff) or none "
                "(ia3); split it in PEFT")
        return {}
