"""BOFT, Butterfly Orthogonal Finetuning — Liu et al. 2024, https://arxiv.org/abs/2311.06243
(PEFT's BOFT)

    x' = x M,  M = M_{m−1} ⋯ M_1 M_0,  M_i = P_i B_i P_iᵀ,   y' = s ⊙ (x' Wᵀ) + b

B_i = blockdiag of D Cayley blocks (I − S)(I + S)⁻¹, S = (R − Rᵀ)/2 (b × b each, d_in = D·b), P_i
the i-th butterfly permutation (P_0 = I), s a per-output scale. The rotation runs in an input
pre-hook (W is never read: bitsandbytes 4bit/8bit bases work as they are) and s in an output
hook, which sees y already computed from x'. No gathers: P_i is a view (x seen as (G, 2, 2^i,
b/2), G = D/2^i: block (g, a) holds x[g, :, a, :]). M is block-diagonal with blocks of
c = b·2^(m−1), so when c ≤ 64 the hook builds those blocks once per call (the factors run on a
K × d_in "comb" of identities, K = c grouped up to ≥ 32) and applies them as one batched block
matmul, d_in·K MACs per token; otherwise it applies the m factors one by one, m·d_in·b per
token. Either way no d_in × d_in tensor. PEFT instead builds the d_in × d_in M (two d_in³ bmm
per factor) and x M on every call.

- ``lora_R`` (m, D, b, b), zeros (PEFT's ``boft_R``, same layout); ``lora_s`` (d_out,), ones
  (PEFT's ``boft_s`` is (d_out, 1)). The bias passes unscaled: y' = s ⊙ (y − b) + b.
- Knobs as PEFT: ``block_size`` b (``boft_block_size``) or ``block_num`` D (``boft_block_num``),
  exactly one non-zero; ``n_butterfly_factor`` m (``boft_n_butterfly_factor``; m > 1 needs b and
  D even, and D a multiple of 2^(m−1)); ``dropout`` (``boft_dropout``: in training, int(p·D)
  blocks of one random factor become I).
- Identity at init: R = 0 gives B_i = I exactly, permutations move values without rounding and
  s = 1: bit for bit the base.
- PEFT caveat: without its CUDA extension (CPU, or no ninja) PEFT silently runs m = 1 whatever
  ``boft_n_butterfly_factor`` says, so a PEFT adapter trained there has m = 1 tensors under a
  config saying m; PEFT's own loader (on such a machine) follows the tensors, and so does
  lora-lite's import (``peft_fields_for_tensors``: m = 1 from the tensors, with a warning).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

import lora_lite as ll

from .oft import peft_target_modules, peft_type_of
from .rotations import at_least_fp32, rotate_blocks


@dataclass
class BOFTConfig(ll.AdapterConfig):
    variant: str = "boft"
    block_size: int = ll.knob(4, "[0, inf)")  # b (PEFT boft_block_size); 0 -> given by block_num
    block_num: int = ll.knob(0, "[0, inf)")   # D (PEFT boft_block_num); 0 -> D = d_in / block_size
    n_butterfly_factor: int = ll.knob(1, "[1, inf)", why="1 = plain block-diagonal OFT")  # m
    dropout: float = ll.knob(0.0, "[0, 1)", why="a probability")

    uses_rank = False

    def validate(self):
        super().validate()
        ll.check((self.block_size > 0) != (self.block_num > 0), "block_size", self.block_size,
                 f"exactly one of block_size and block_num non-zero (block_num={self.block_num})")


def butterfly_layout(d_in: int, cfg) -> tuple[int, int, int]:
    """(m, D, b); ValueError naming the constraint PEFT enforces if the layer does not fit."""
    m = cfg.n_butterfly_factor
    b = cfg.block_size or (d_in // cfg.block_num if d_in % cfg.block_num == 0 else 0)
    if not b or d_in % b:
        raise ValueError(f"boft: d_in={d_in} does not split into blocks (block_size="
                         f"{cfg.block_size}, block_num={cfg.block_num}); pick a divisor of {d_in}")
    n_blocks = d_in // b
    if m > 1 and (b % 2 or n_blocks % 2 or n_blocks % 2 ** (m - 1)
                  or m - 1 > int(math.log2(n_blocks))):
        raise ValueError(f"boft: n_butterfly_factor={m} needs an even block size and block count "
                         f"with block_num a multiple of {2 ** (m - 1)}; this layer has d_in="
                         f"{d_in}, block_size={b}, block_num={n_blocks}")
    return m, n_blocks, b


def cayley_blocks(R: torch.Tensor) -> torch.Tensor:
    """(m, D, b, b) free blocks -> orthogonal (I − S)(I + S)⁻¹, S = (R − Rᵀ)/2 (PEFT's order)."""
    m, n_blocks, b, _ = R.shape
    work = at_least_fp32(R)                                               # no half/bf16 LU
    flat = work.reshape(m * n_blocks, b, b)
    skew = 0.5 * (flat - flat.transpose(1, 2))
    eye = torch.eye(b, device=R.device, dtype=work.dtype).unsqueeze(0).expand(m * n_blocks, b, b)
    out = torch.linalg.solve(eye + skew, eye - skew, left=False).reshape(m, n_blocks, b, b)
    return out.to(R.dtype)


def butterfly_dropout(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """PEFT's multiplicative dropout: in one random factor, int(p·D) blocks become I."""
    m, n_blocks, b, _ = blocks.shape
    n_drop = int(p * n_blocks)
    if n_drop == 0:
        return blocks
    mask = torch.zeros(m, n_blocks, 1, 1, device=blocks.device, dtype=blocks.dtype)
    mask[torch.randint(0, m, (1,)).item(), torch.randperm(n_blocks)[:n_drop]] = 1.0
    return (1 - mask) * blocks + mask * torch.eye(b, device=blocks.device, dtype=blocks.dtype)


# Fused blocks are built when the product's blocks stay this small; above it the factors are
# applied one by one (m·d_in·b MACs per token instead of d_in·K).
FUSE_MAX_BLOCK = 64
# Fused blocks are grouped up to at least this size (exact: the extra entries are zeros), because
# batched matmuls of 4×4 or 8×8 blocks waste most of their time on overhead.
MIN_MATMUL_BLOCK = 32


def apply_factor(x: torch.Tensor, factor: torch.Tensor, spread: int) -> torch.Tensor:
    """x (..., d_in) ↦ x P B Pᵀ for one butterfly factor: D blocks (D, b, b) whose permutation P
    (PEFT's ``block_butterfly_perm``) is a view: with x seen as (G, 2, A, b/2), A = ``spread`` =
    2^i, G = D/A, block g·A + a takes the values x[g, :, a, :] and writes its result back there."""
    n_blocks, b, _ = factor.shape
    groups, half = n_blocks // spread, b // 2
    xv = x.reshape(-1, groups, 2, spread, half)                          # (N, G, 2, A, h)
    xb = xv.permute(1, 3, 0, 2, 4).reshape(n_blocks, -1, b)              # (G·A, N, b), one copy
    out = (xb @ factor).reshape(groups, spread, -1, 2, half)             # (G, A, N, 2, h)
    return out.permute(2, 0, 3, 1, 4).reshape(x.shape)


def apply_factors(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x (..., d_in) ↦ x M_{m−1} ⋯ M_0 for orthogonal blocks (m, D, b, b), factor by factor."""
    for i in reversed(range(blocks.shape[0])):                         # M_{m−1} acts first
        x = apply_factor(x, blocks[i], 2 ** i)
    return x


def fused_block_size(d_in: int, m: int, b: int) -> int:
    """K for fused_blocks, or 0 when the factors are applied one by one. M = M_{m−1} ⋯ M_0 is
    block-diagonal with blocks of c = b·2^(m−1) (factor i only mixes groups of b·2^i); K is c, or
    c·2^j ≥ MIN_MATMUL_BLOCK where that still divides d_in into at least two blocks."""
    c = b * 2 ** (m - 1)
    if c > FUSE_MAX_BLOCK or 2 * c > d_in:
        return 0
    k = c
    while k < MIN_MATMUL_BLOCK and d_in % (2 * k) == 0 and 4 * k <= d_in:
        k *= 2
    return k


def fused_blocks(blocks: torch.Tensor, d_in: int, k: int) -> torch.Tensor:
    """M's diagonal blocks (d_in/K, K, K), built once per call by running the factors on the
    'comb' E (K, d_in), E[j, g·K + j] = 1: row j of E M holds row j of every block (m·K·d_in·b
    MACs; no d_in × d_in tensor)."""
    comb = torch.eye(k, device=blocks.device, dtype=blocks.dtype).repeat(1, d_in // k)
    rows = apply_factors(comb, blocks)                                 # (K, d_in)
    return rows.reshape(k, d_in // k, k).transpose(0, 1)              # (G, K, K)


def apply_butterfly(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x (..., d_in) ↦ x M_{m−1} ⋯ M_0 for orthogonal blocks (m, D, b, b): one block matmul on
    M's fused blocks when they are small (fused_block_size), else the factors one by one."""
    m, _, b, _ = blocks.shape
    d_in = x.shape[-1]
    k = fused_block_size(d_in, m, b)
    if k == 0:
        return apply_factors(x, blocks)
    return rotate_blocks(x, fused_blocks(blocks, d_in, k))


class BOFT(ll.Variant):
    name = "boft"
    config = BOFTConfig
    paper = "https://arxiv.org/abs/2311.06243"
    train_defaults = {"lr": 2e-3, "knobs": {"block_size": 4, "n_butterfly_factor": 2}}
    cost_note = ("m·D Cayley solves (b×b) once per call, not counted as matmuls; M's blocks "
                 "(K = b·2^(m−1), grouped up to ≥ 32) are built once per call and applied as one "
                 "batched block matmul, d_in·K MACs/token (m·d_in·b when the blocks would pass "
                 "64 and the factors run one by one), plus d_out for the scale")
    peft_cost_note = ("PEFT builds the d_in×d_in butterfly matrix on every call (2 d_in³ bmm per "
                      "factor, with dense permutation matrices) and then x M, d_in² MACs/token")

    def param_specs(d_in, d_out, cfg):
        m, n_blocks, b = butterfly_layout(d_in, cfg)
        return {"lora_R": ll.ParamSpec((m, n_blocks, b, b), init="zeros"),
                "lora_s": ll.ParamSpec((d_out,), init="ones")}

    def forward_input(layer, x, cfg):
        # x: (..., d_in) in cfg.dtype
        blocks = cayley_blocks(at_least_fp32(layer.lora_R))   # (m, D, b, b); no bf16 solve
        if layer.training and cfg.dropout > 0:
            blocks = butterfly_dropout(blocks, cfg.dropout)
        return apply_butterfly(x, blocks.to(x.dtype))

    def forward(layer, x, y, cfg):
        # y: (..., d_out), computed by the base from the rotated x; the bias passes unscaled
        bias = getattr(layer, "bias", None)
        s = layer.lora_s.to(y.dtype)
        if bias is None:
            return y * s
        return (y - bias) * s + bias

    def added_macs(target, cfg):
        m, n_blocks, b = butterfly_layout(target.d_in, cfg)
        solves = 2 * m * n_blocks * b ** 3
        k = fused_block_size(target.d_in, m, b)
        if k == 0:
            return m * target.d_in * b + target.d_out, solves
        return target.d_in * k + target.d_out, solves + m * k * target.d_in * b

    def merged_weight(layer, cfg):
        W = ll.dense_weight(layer)                            # (d_out, d_in) fp32
        eye = torch.eye(W.shape[1], dtype=torch.float32, device=layer.lora_R.device)
        M = apply_butterfly(eye, cayley_blocks(layer.lora_R.float()))   # differentiable: see OFT's
        return layer.lora_s.float()[:, None] * (W @ M.T), None

    def peft_config(cfg, target_names):
        return {"peft_type": "BOFT", "boft_block_size": cfg.block_size,
                "boft_block_num": cfg.block_num, "boft_n_butterfly_factor": cfg.n_butterfly_factor,
                "boft_dropout": cfg.dropout, "target_modules": peft_target_modules(target_names),
                "bias": "none", "init_weights": True, "fan_in_fan_out": False}

    def peft_state(layer, cfg):
        return {"boft_R": layer.lora_R.detach().clone(),
                "boft_s": layer.lora_s.detach().clone()[:, None]}

    def from_peft(peft_config):
        if peft_type_of(peft_config) != "BOFT":
            return None
        if peft_config.get("fan_in_fan_out") or peft_config.get("bias", "none") != "none":
            raise ValueError("boft: only PEFT BOFT adapters with fan_in_fan_out=False and "
                             "bias='none' can be imported")
        out = {"block_size": int(peft_config.get("boft_block_size", 0) or 0),
               "block_num": int(peft_config.get("boft_block_num", 0) or 0),
               "n_butterfly_factor": int(peft_config.get("boft_n_butterfly_factor", 1) or 1),
               "dropout": float(peft_config.get("boft_dropout", 0.0) or 0.0)}
        return out

    def peft_fields_for_tensors(fields, tensors_by_module):
        """m as the tensors hold it: PEFT's CPU build trains one factor whatever the config says
        (and its loader follows the tensors); any other disagreement is left to load_peft_state."""
        factors = {int(t["boft_R"].shape[0]) for t in tensors_by_module.values()
                   if "boft_R" in t and t["boft_R"].dim() == 4}
        if factors == {1} and fields.get("n_butterfly_factor", 1) > 1:
            warnings.warn(f"boft: the PEFT config says boft_n_butterfly_factor="
                          f"{fields['n_butterfly_factor']} but its tensors hold one butterfly "
                          "factor (PEFT without its CUDA extension trains one): loaded with "
                          "n_butterfly_factor=1, as PEFT's own loader does", UserWarning, stacklevel=2)
            fields["n_butterfly_factor"] = 1
        return fields

    def load_peft_state(layer, cfg, tensors):
        R, s = tensors["boft_R"], tensors["boft_s"]
        if tuple(R.shape) != tuple(layer.lora_R.shape):
            raise ValueError(f"boft: PEFT's boft_R has shape {tuple(R.shape)}, this layer needs "
                             f"{tuple(layer.lora_R.shape)} (from the config's block size, block "
                             "count and butterfly factors): the folder is inconsistent")
        with torch.no_grad():
            layer.lora_R.copy_(R)
            layer.lora_s.copy_(s.reshape(-1))
