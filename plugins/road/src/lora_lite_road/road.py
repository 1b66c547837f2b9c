"""RoAd, 2-D rotary adaptation — Liao et al. 2024, https://arxiv.org/abs/2409.00119

    y' = y ⊙ c + rot_half(y) ⊙ s,   y = x Wᵀ + b,   c = α cos θ,  s = α sin θ

an output hook (the bias is rotated too, as PEFT's unmerged path). The outputs are split into
groups of g = group_size; in each group, channel j < g/2 pairs with j + g/2, and
rot_half(y) = (−y_second_half, y_first_half) per group, so each pair (a, b) becomes
(c_a y_a − s_a y_b, c_b y_b + s_b y_a). θ = 0, α = 1 give c = 1, s = 0: exactly the identity.

road_variant sets how many (θ, α) there are, with PEFT's layout (lora_road_theta/alpha are
PEFT's road_theta/road_alpha as they are):
  road_1: d_out/2 each, one per pair, shared by both channels of the pair (a scaled rotation);
  road_2: d_out each, one per channel;
  road_4: 2·d_out each; per group, the first g give c (α cos θ), the next g give s (α sin θ).
r and alpha (the config's) are unused.

Interop: y' is linear in y, so the layer merges to W'ᵀ = Wᵀ P and b' = b P (the bias is rotated
too: ``as_lora_rank`` export refuses layers with a bias); exports to / imports from PEFT's
RoadConfig (road_theta, road_alpha, variant, group_size).
"""
from dataclasses import dataclass
from typing import ClassVar

import torch

import lora_lite as ll

PARAMS_PER_OUTPUT = {"road_1": 0.5, "road_2": 1, "road_4": 2}


@dataclass
class RoadConfig(ll.AdapterConfig):
    variant: str = "road"
    road_variant: str = ll.knob("road_1", choices=sorted(PARAMS_PER_OUTPUT))
    group_size: int = ll.knob(64, "[2, inf)", why="even: channel j pairs with j + group_size/2")

    uses_rank: ClassVar[bool] = False

    def validate(self):
        super().validate()
        ll.check(self.group_size % 2 == 0, "group_size",
                 self.group_size, "a positive even integer (channel j pairs with j + group_size/2)")


def coefficients(theta, alpha, road_variant, group_size):
    """(c, s), each (d_out,), from the stored parameters in PEFT's layout."""
    half = group_size // 2
    if road_variant == "road_1":      # (d_out/2,): one value per pair, used by both channels
        theta = theta.view(-1, 1, half).expand(-1, 2, half).reshape(-1)
        alpha = alpha.view(-1, 1, half).expand(-1, 2, half).reshape(-1)
        return alpha * theta.cos(), alpha * theta.sin()
    if road_variant == "road_2":      # (d_out,): one value per channel
        return alpha * theta.cos(), alpha * theta.sin()
    theta = theta.view(-1, 2, group_size)   # road_4, (2·d_out,): [c block, s block] per group
    alpha = alpha.view(-1, 2, group_size)
    return ((alpha[:, 0] * theta[:, 0].cos()).reshape(-1),
            (alpha[:, 1] * theta[:, 1].sin()).reshape(-1))


def rotate_half(y, group_size):
    """Per group of channels: (first, second) -> (−second, first)."""
    grouped = y.reshape(*y.shape[:-1], -1, 2, group_size // 2)
    return torch.stack((-grouped[..., 1, :], grouped[..., 0, :]), dim=-2).reshape(y.shape)


class RoAd(ll.Variant):
    name = "road"
    config = RoadConfig
    paper = "https://arxiv.org/abs/2409.00119"
    train_defaults = {"lr": 5e-3}   # measured: 62% at 2e-3, 66% at 5e-3 (loss 0.18 vs 0.11)
    cost_note = "elementwise 2-D rotations only: no matmul"
    peft_cost_note = "elementwise rotations only"

    def added_macs(target, cfg):
        # elementwise rotations: no multiply-accumulate in a matmul
        return 0, 0

    def param_specs(d_in, d_out, cfg):
        ll.check(d_out % cfg.group_size == 0, "group_size", cfg.group_size,
                 f"a divisor of every target's output size; a target has d_out = {d_out}")
        size = int(d_out * PARAMS_PER_OUTPUT[cfg.road_variant])
        return {"lora_road_theta": ll.ParamSpec((size,), init="zeros"),
                "lora_road_alpha": ll.ParamSpec((size,), init="ones")}

    def forward(layer, x, y, cfg):
        # y: (..., d_out) base output, bias included. c and s are computed in cfg.dtype, the
        # products in the wider of that and y's dtype (type promotion): identity stays exact.
        c, s = coefficients(layer.lora_road_theta, layer.lora_road_alpha, cfg.road_variant,
                            cfg.group_size)
        return y * c + rotate_half(y, cfg.group_size) * s

    def merged_weight(layer, cfg):
        W_t = ll.dense_weight(layer).T.to(layer.lora_road_theta.dtype)  # (d_in, d_out): rows are y's
        merged = RoAd.forward(layer, None, W_t, cfg).float().T
        bias = getattr(layer, "bias", None)
        if bias is None:
            return merged, None
        return merged, RoAd.forward(layer, None, bias.detach().to(W_t.dtype)[None], cfg).float()[0]

    def peft_config(cfg, target_names):
        return {"peft_type": "ROAD", "target_modules": list(target_names), "variant": cfg.road_variant,
                "group_size": cfg.group_size, "init_weights": True}

    def peft_state(layer, cfg):
        return {"road_theta": layer.lora_road_theta, "road_alpha": layer.lora_road_alpha}

    def from_peft(peft_config):
        if peft_config.get("peft_type") != "ROAD":
            return None
        return {"road_variant": peft_config.get("variant", "road_1"),
                "group_size": int(peft_config.get("group_size", 64))}

    def load_peft_state(layer, cfg, tensors):
        for name in ("road_theta", "road_alpha"):
            dst = getattr(layer, f"lora_{name}")
            dst.copy_(ll.peft_tensor(tensors, name, dst.shape))
