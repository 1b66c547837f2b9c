"""Small orthogonal blocks from skew-symmetric parameters, in PEFT's exact order of operations.

Every function works on a batch of b × b blocks; nothing here ever forms a d_in × d_in matrix.
Convention: a block R acts on a row vector, x_blk ↦ x_blk R (as PEFT's einsum "...rk,rkc->...rc").
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=64)
def _triu(block_size: int, device_str: str):
    rows, cols = torch.triu_indices(block_size, block_size, 1)
    return rows.to(device_str), cols.to(device_str)


def skew_from_packed(vec: torch.Tensor, block_size: int) -> torch.Tensor:
    """(n, b(b−1)/2) upper-triangle vectors -> (n, b, b) skew-symmetric Q = U − Uᵀ (PEFT's OFT)."""
    rows, cols = _triu(block_size, str(vec.device))
    q = torch.zeros(vec.shape[0], block_size, block_size, device=vec.device, dtype=vec.dtype)
    q[:, rows, cols] = vec
    return q - q.transpose(-2, -1)


def packed_from_skew(q: torch.Tensor) -> torch.Tensor:
    rows, cols = _triu(q.shape[-1], str(q.device))
    return q[:, rows, cols]


def cayley_neumann(q: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT's truncated Neumann series for its Cayley map: I + 2Q + 2Q² + … + 2Q^{t−2} + Q^{t−1}
    (for terms t ≥ 3; t = 2 gives I + 2Q, t ≤ 1 gives I)."""
    n, b, _ = q.shape
    r = torch.eye(b, device=q.device, dtype=q.dtype).repeat(n, 1, 1)
    if terms > 1:
        r = r + 2.0 * q
        if terms > 2:
            q2 = torch.bmm(q, q)
            r = r + 2.0 * q2
            power = q2
            for _ in range(3, terms - 1):
                power = torch.bmm(power, q)
                r = r + 2.0 * power
            power = torch.bmm(power, q)
            r = r + power
    return r


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """fp32 for half-precision tensors (after model.half() / .bfloat16()), else as is."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def cayley_exact(q: torch.Tensor) -> torch.Tensor:
    """(I − Q)(I + Q)⁻¹ per block: the X with X (I + Q) = I − Q (PEFT's solve(..., left=False))."""
    n, b, _ = q.shape
    work = at_least_fp32(q)                                               # no half/bf16 LU
    eye = torch.eye(b, device=q.device, dtype=work.dtype).unsqueeze(0).expand(n, b, b)
    return torch.linalg.solve(eye + work, eye - work, left=False).to(q.dtype)


def coft_project(vec: torch.Tensor, block_size: int, eps: float) -> torch.Tensor:
    """Constrained OFT: pull each block's Q back onto the Frobenius ball of radius eps/√n
    (PEFT's ``_project_batch``); returns packed vectors."""
    q = skew_from_packed(vec, block_size)
    radius = eps / torch.sqrt(torch.tensor(float(q.shape[0])))
    norm = torch.norm(q, dim=(1, 2), keepdim=True)
    out = torch.where(norm <= radius, q, radius * (q / norm))
    return packed_from_skew(out)


def identity_dropout(blocks: torch.Tensor, p: float, generator=None) -> torch.Tensor:
    """Multiplicative dropout: int(p·D) of the D blocks (…, D, b, b) become I (PEFT's layer)."""
    d, b = blocks.shape[-3], blocks.shape[-1]
    n_drop = int(p * d)
    if n_drop == 0:
        return blocks
    mask = torch.zeros(d, device=blocks.device, dtype=blocks.dtype)
    mask[torch.randperm(d, generator=generator)[:n_drop].to(blocks.device)] = 1.0
    mask = mask.view(d, 1, 1)
    eye = torch.eye(b, device=blocks.device, dtype=blocks.dtype)
    return (1 - mask) * blocks + mask * eye


def rotate_blocks(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x (..., D·b) ↦ per block x_blk R_blk; blocks (D, b, b), or (1, b, b) shared by all blocks.

    One batched matmul over a transposed view of x (D, tokens, b): no gather, no index tensors;
    the only copy is the result's, back to x's layout (what the base layer reads)."""
    d_in = x.shape[-1]
    b = blocks.shape[-1]
    if blocks.shape[0] == 1:                                   # one shared block: a plain matmul
        return (x.reshape(*x.shape[:-1], d_in // b, b) @ blocks[0]).reshape(x.shape)
    xb = x.reshape(-1, d_in // b, b).transpose(0, 1)           # (D, tokens, b), a view
    return (xb @ blocks).transpose(0, 1).reshape(x.shape)
