"""OFT, Orthogonal Finetuning — Qiu et al. 2023, https://arxiv.org/abs/2306.07280 (PEFT's OFT)

    x' = x R,  R = blockdiag(R_1, …, R_D),  R_i = Cayley(Q_i),  Q_i = U_i − U_iᵀ,   y' = x' Wᵀ + b

an input pre-hook: the rotation acts on x, W is never read, so bitsandbytes 4bit/8bit bases work
as they are. Equivalent to PEFT's W' = W Rᵀ. d_in = D·b; each b × b block is applied to its slice
of x (O(d_in·b) per token), all D at once as one batched matmul over a transposed view of x;
no d_in × d_in matrix is built.

- ``lora_R`` (D, b(b−1)/2), zeros: the strict upper triangle U_i of each skew block, packed in
  ``torch.triu_indices`` order (PEFT's ``oft_R.weight``, same shape and layout). With
  ``block_share`` it is (1, b(b−1)/2), one block for every slice.
- Cayley map: PEFT's truncated Neumann series I + 2Q + 2Q² + … + Q^{t−1} (t =
  ``num_cayley_neumann_terms``, ``use_cayley_neumann=True``, PEFT's default) or the exact
  (I − Q)(I + Q)⁻¹ (``use_cayley_neumann=False``).
- ``coft``: constrained OFT; before each forward the parameters are projected (in place, no grad)
  onto ‖Q_i‖_F ≤ eps/√D, as PEFT does.
- ``module_dropout``: in training, int(p·D) random blocks are replaced by I each forward. (PEFT
  0.21 builds this layer for nn.Linear but never calls it.)
- Identity at init: Q = 0 gives R = I exactly, and x·1 + 0 is exact: bit for bit the base.
- ``block_size`` (PEFT ``oft_block_size``) or ``blocks`` (PEFT ``r``; then b = d_in / blocks per
  layer); exactly one is non-zero. d_in must be divisible (PEFT silently picks a nearby divisor
  instead; lora-lite refuses).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import lora_lite as ll

from .rotations import (
    at_least_fp32,
    cayley_exact,
    cayley_neumann,
    coft_project,
    identity_dropout,
    rotate_blocks,
    skew_from_packed,
)


@dataclass
class OFTConfig(ll.AdapterConfig):
    variant: str = "oft"
    block_size: int = ll.knob(32, "[0, inf)")  # b (PEFT oft_block_size); 0 -> given by `blocks`
    blocks: int = ll.knob(0, "[0, inf)")       # D (PEFT r); 0 -> D = d_in / block_size
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = ll.knob(5, "[0, inf)")
    coft: bool = False
    eps: float = ll.knob(6e-5, "(0, inf)")
    block_share: bool = False
    module_dropout: float = ll.knob(0.0, "[0, 1)", why="a probability")

    uses_rank = False

    def validate(self):
        super().validate()
        ll.check((self.block_size > 0) != (self.blocks > 0), "block_size", self.block_size,
                 f"exactly one of block_size and blocks non-zero (blocks={self.blocks})")


def block_layout(d_in: int, cfg) -> tuple[int, int]:
    """(D, b) for a layer with d_in inputs; ValueError naming the fix if d_in does not split."""
    if cfg.block_size:
        b = cfg.block_size
        if d_in % b:
            raise ValueError(f"oft: d_in={d_in} is not divisible by block_size={b}; pick a divisor "
                             f"of {d_in} (or set blocks=D instead)")
        return d_in // b, b
    if d_in % cfg.blocks:
        raise ValueError(f"oft: d_in={d_in} is not divisible by blocks={cfg.blocks}; pick a "
                         f"divisor of {d_in} (or set block_size=b instead)")
    return cfg.blocks, d_in // cfg.blocks


def rotation_blocks(layer, cfg, d_in) -> torch.Tensor:
    """The orthogonal blocks (D or 1, b, b) from ``lora_R`` (projected first when coft)."""
    _, b = block_layout(d_in, cfg)
    if cfg.coft:
        with torch.no_grad():
            layer.lora_R.copy_(coft_project(layer.lora_R, b, cfg.eps))
    q = skew_from_packed(at_least_fp32(layer.lora_R), b)   # solve has no bf16/fp16 CPU kernel
    if cfg.use_cayley_neumann:
        return cayley_neumann(q, cfg.num_cayley_neumann_terms)
    return cayley_exact(q)


def merged_rotation(layer, cfg, d_in) -> torch.Tensor:
    """R (d_in, d_in) with x' = x R, built by rotating the identity's rows; differentiable in
    lora_R (parameter targets train through merged_weight)."""
    eye = torch.eye(d_in, dtype=torch.float32, device=layer.lora_R.device)
    return rotate_blocks(eye, rotation_blocks(layer, cfg, d_in).float())


def peft_type_of(peft_config) -> str:
    value = peft_config.get("peft_type", "")
    return str(getattr(value, "value", value)).upper()     # PEFT's to_dict keeps its enum


def peft_target_modules(target_names):
    return sorted(target_names)


class OFT(ll.Variant):
    name = "oft"
    config = OFTConfig
    paper = "https://arxiv.org/abs/2306.07280"
    train_defaults = {"lr": 2e-3, "knobs": {"block_size": 32}}
    cost_note = ("the D Cayley maps (b×b, a few bmm each) are built once per call; the rotation "
                 "is one batched matmul of the D blocks over a view of x, d_in·b MACs/token")
    peft_cost_note = "PEFT's OFT applies the same block einsum (block_share repeats the block D times)"

    def param_specs(d_in, d_out, cfg):
        n_blocks, b = block_layout(d_in, cfg)
        return {"lora_R": ll.ParamSpec((1 if cfg.block_share else n_blocks, b * (b - 1) // 2),
                                       init="zeros")}

    def forward_input(layer, x, cfg):
        # x: (..., d_in) in cfg.dtype
        blocks = rotation_blocks(layer, cfg, x.shape[-1])     # (D or 1, b, b)
        if layer.training and cfg.module_dropout > 0 and blocks.shape[0] > 1:
            blocks = identity_dropout(blocks, cfg.module_dropout)
        return rotate_blocks(x, blocks.to(x.dtype))

    def added_macs(target, cfg):
        n_blocks, b = block_layout(target.d_in, cfg)
        built = 1 if cfg.block_share else n_blocks
        terms = max(cfg.num_cayley_neumann_terms - 2, 0) if cfg.use_cayley_neumann else 2
        return target.d_in * b, built * terms * b ** 3

    def merged_weight(layer, cfg):
        W = ll.dense_weight(layer)                            # (d_out, d_in) fp32
        return W @ merged_rotation(layer, cfg, W.shape[1]).T, None   # x R Wᵀ = x (W Rᵀ)ᵀ

    def peft_config(cfg, target_names):
        return {"peft_type": "OFT", "r": cfg.blocks, "oft_block_size": cfg.block_size,
                "target_modules": peft_target_modules(target_names),
                "module_dropout": cfg.module_dropout, "coft": cfg.coft, "eps": cfg.eps,
                "block_share": cfg.block_share, "use_cayley_neumann": cfg.use_cayley_neumann,
                "num_cayley_neumann_terms": cfg.num_cayley_neumann_terms, "bias": "none",
                "init_weights": True, "fan_in_fan_out": False}

    def peft_state(layer, cfg):
        return {"oft_R.weight": layer.lora_R.detach().clone()}

    def from_peft(peft_config):
        if peft_type_of(peft_config) != "OFT":
            return None
        if peft_config.get("fan_in_fan_out") or peft_config.get("bias", "none") != "none":
            raise ValueError("oft: only PEFT OFT adapters with fan_in_fan_out=False and bias='none' "
                             "can be imported")
        out = {"block_size": int(peft_config.get("oft_block_size", 0) or 0),
               "blocks": int(peft_config.get("r", 0) or 0)}
        for key in ("module_dropout", "coft", "eps", "block_share", "use_cayley_neumann",
                    "num_cayley_neumann_terms"):
            if key in peft_config:
                out[key] = peft_config[key]
        return out

    def load_peft_state(layer, cfg, tensors):
        weight = tensors["oft_R.weight"]
        if tuple(weight.shape) != tuple(layer.lora_R.shape):
            raise ValueError(f"oft: PEFT's oft_R has shape {tuple(weight.shape)}, this layer needs "
                             f"{tuple(layer.lora_R.shape)}; check oft_block_size / r / block_share")
        with torch.no_grad():
            layer.lora_R.copy_(weight)
