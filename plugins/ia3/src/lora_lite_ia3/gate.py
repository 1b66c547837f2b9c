"""What the two IA3 placements share: one learned elementwise gate ``lora_g`` = 1 at init (the
exact identity), no rank, and PEFT's IA3Config with that gate stored as ``ia3_l``. The placement
(output gate on y, or input gate on x) and the gate's shape are each variant's own."""
from dataclasses import dataclass
from typing import ClassVar

import lora_lite as ll

PAPER = "https://arxiv.org/abs/2205.05638"


@dataclass
class GateConfig(ll.AdapterConfig):
    """r and alpha are unused."""

    uses_rank: ClassVar[bool] = False


def ia3_peft_config(target_names, feedforward) -> dict:
    """PEFT's IA3Config content; ``feedforward``: the targets PEFT gates on the input side."""
    return {"peft_type": "IA3", "target_modules": list(target_names),
            "feedforward_modules": list(feedforward), "init_ia3_weights": True}


class GateVariant(ll.Variant):
    """Base of ``ia3`` and ``ia3_ff``; subclasses give name, config, param_specs (the gate's
    shape), the hook, merged_weight, peft_config / peft_state / from_peft."""

    paper = PAPER
    train_defaults = {"lr": 2e-2}  # targets: the variant's default_target_names (placement.py)
    peft_cost_note = "elementwise gain only"

    def added_macs(target, cfg):
        return 0, 0  # d_in or d_out multiplications per token: no matmul, nothing to count

    def load_peft_state(layer, cfg, tensors):
        layer.lora_g.copy_(ll.peft_tensor(tensors, "ia3_l", layer.lora_g.shape))
