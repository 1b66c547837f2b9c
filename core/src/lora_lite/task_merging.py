"""Combining task tensors as PEFT's ``merge_utils`` defines it (task arithmetic, magnitude
pruning, TIES, DARE), over plain tensors; random pruning draws from a ``torch.Generator``.

    combine_tensors(how, [t_1, ...], weights, density, generator, majority_sign="total")
"""
from __future__ import annotations

import torch

HOWS = ("linear", "magnitude_prune", "ties", "dare_linear", "dare_ties")


def _weighted(tensors, weights):
    stacked = torch.stack(tensors, dim=0)
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))


def _magnitude(tensor, density):
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    mask[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel())).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def _random(tensor, density, generator):
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def _disjoint(weighted, signs_of, majority_sign):
    sign = signs_of.sign()
    magnitude = signs_of.sum(dim=0) if majority_sign == "total" else sign.sum(dim=0)
    keep = sign == torch.where(magnitude >= 0, 1, -1)
    return (weighted * keep).sum(dim=0) / torch.clamp(keep.sum(dim=0), min=1.0)


def combine_tensors(how, tensors, weights, density=None, generator=None, majority_sign="total"):
    weights = torch.as_tensor(weights, dtype=tensors[0].dtype, device=tensors[0].device)
    if how == "linear":
        return _weighted(tensors, weights).sum(dim=0)
    if how in ("magnitude_prune", "ties"):
        tensors = [_magnitude(t, density) for t in tensors]
    else:
        tensors = [_random(t, density, generator) for t in tensors]
    if how in ("magnitude_prune", "dare_linear"):
        return _weighted(tensors, weights).sum(dim=0)
    return _disjoint(_weighted(tensors, weights), torch.stack(tensors, dim=0), majority_sign)
