"""combine: several attached adapters -> one new low-rank adapter, as PEFT's
``add_weighted_adapter`` defines it.

Factor-wise (``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: same rank;
``cat``: ranks add up): on the adapters' low-rank factors, read through the variant capability
``lowrank_factors(layer, cfg) -> (A, B, scale)`` (delta = scale · B A), with PEFT's weights
sign·√|w·s| on A and √|w·s| on B. ``svd``: on weight-space deltas (``merged_weight`` − base, any
variant that merges), summed with the weights, then truncated to rank K; the relative Frobenius
error per layer is reported. The result is an adapter of the installed variant that declares
``load_lowrank(layer, cfg, A, B)`` and ``lowrank_config(rank, target_names)`` (unit scale):
core names no variant, it asks the registry which one takes low-rank factors.
"""
from __future__ import annotations

import math
import re

import torch

from .attach import attach_for_loading, detach, one_adapter, refuse_taken_name
from .errors import AttachError
from .layers.weights import base_dense_weight
from .merge import merged_weights
from .plugins import variants
from .slots import as_adapter
from .task_merging import HOWS, combine_tensors

ALL_HOWS = ("svd", "cat", *HOWS)


def lowrank_sink(name=None):
    """The variant new low-rank adapters are made of (one that declares load_lowrank)."""
    sinks = {n: v for n, v in sorted(variants().items())
             if v.load_lowrank is not None and v.lowrank_config is not None}
    if name is not None and name in sinks:
        return sinks[name]
    if not sinks or name is not None:
        raise AttachError("no installed variant takes low-rank factors (load_lowrank / "
                          "lowrank_config); install the plugin of plain low-rank adapters")
    return next(iter(sinks.values()))


def _check(model, names, weights, how, name, density):
    if how not in ALL_HOWS:
        raise ValueError(f"how={how!r}: choose one of {', '.join(ALL_HOWS)}")
    if len(names) < 1 or len(set(names)) != len(names):
        raise ValueError(f"adapters {names}: give one or more distinct adapter names")
    if len(weights) != len(names) or not all(math.isfinite(float(w)) for w in weights):
        raise ValueError(f"weights {weights}: give one finite weight per adapter")
    if how not in ("svd", "cat", "linear") and not (density is not None and 0 < density <= 1):
        raise ValueError(f"how={how!r} needs density in (0, 1], got {density!r}")
    states = [one_adapter(model, n, "combine") for n in names]
    refuse_taken_name(model, name)
    targets = [t.name for t in states[0].targets]
    for s in states[1:]:
        if [t.name for t in s.targets] != targets:
            raise AttachError(f"adapters {names[0]!r} and {s.name!r} sit on different layers; "
                              "combine adapters with the same targets")
    return states


def _factors(states, how):
    """{target: [(A, B, scale)]}, refusing variants without low-rank factors or unequal ranks."""
    out = {}
    for s in states:
        if s.variant.lowrank_factors is None:
            raise AttachError(f"adapter {s.name!r} ({s.cfg.variant}) has no low-rank factors; "
                              "combine it with how='svd' (from its weight-space delta)")
        for t in s.targets:
            with as_adapter(t.layer, s.name):
                A, B, scale = s.variant.lowrank_factors(t.layer, t.layer._lora_cfg)
            out.setdefault(t.name, []).append((A.detach().float(), B.detach().float(), float(scale)))
    ranks = {A.shape[0] for pieces in out.values() for A, _, _ in pieces}
    if how != "cat" and len(ranks) > 1:
        raise AttachError(f"how={how!r} needs adapters of one rank, got ranks {sorted(ranks)}; "
                          "use how='svd' or 'cat'")
    return out


def _factorwise(factors, weights, how, density, generator, majority_sign):
    """{target: (A, B)} of the combination, unit scale."""
    out = {}
    for target, pieces in factors.items():
        if how == "cat":
            A = torch.cat([a * w * s for (a, _, s), w in zip(pieces, weights, strict=True)], dim=0)
            out[target] = (A, torch.cat([b for _, b, _ in pieces], dim=1))
            continue
        ws = [w * s for (_, _, s), w in zip(pieces, weights, strict=True)]
        wa = [math.copysign(math.sqrt(abs(v)), v if v != 0 else 1.0) for v in ws]
        wb = [math.sqrt(abs(v)) for v in ws]
        A = combine_tensors(how, [a for a, _, _ in pieces], wa, density, generator, majority_sign)
        B = combine_tensors(how, [b for _, b, _ in pieces], wb, density, generator, majority_sign)
        out[target] = (A, B)
    return out


def _svd(model, states, weights, rank):
    """{target: (A, B)} rank-``rank`` of Σ w_i ΔW_i, and {target: relative error}."""
    deltas = {}
    for s, w in zip(states, weights, strict=True):
        merged = merged_weights(model, name=s.name)
        for t in s.targets:
            delta = merged[t.name][0] - base_dense_weight(t.layer).float()
            deltas[t.name] = deltas.get(t.name, 0) + w * delta
    out, errors = {}, {}
    for target, delta in deltas.items():
        U, S, Vh = torch.linalg.svd(delta, full_matrices=True)
        B, A = U[:, :rank] @ torch.diag(S[:rank]), Vh[:rank, :]
        out[target] = (A, B)
        errors[target] = ((delta - B @ A).norm() / delta.norm().clamp_min(1e-30)).item()
    return out, errors


def combine(model, names, weights, how="svd", name="combined", rank=None, density=None, seed=0,
            majority_sign="total", sink=None) -> dict:
    """Attach a new adapter ``name`` combining adapters ``names`` with ``weights``. Returns
    {"name", "variant", "how", "rank", "layers": {target: {"relative_error"}} (svd)}. Every
    factor is computed before anything is attached; a refusal leaves the model unchanged."""
    names, weights = list(names), [float(w) for w in weights]
    states = _check(model, names, weights, how, name, density)
    sink_cls = lowrank_sink(sink)
    errors = {}
    if how == "svd":
        if rank is None:  # as PEFT: the largest rank among the adapters
            rank = max((getattr(s.cfg, "r", 0) for s in states), default=0) or None
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank={rank!r}: give a positive integer rank")
        pieces, errors = _svd(model, states, weights, rank)
    else:
        generator = torch.Generator().manual_seed(seed)
        pieces = _factorwise(_factors(states, how), weights, how, density, generator, majority_sign)
        rank = next(iter(pieces.values()))[0].shape[0]
    targets = states[0].targets
    cfg = sink_cls.lowrank_config(rank, tuple(f"^{re.escape(t.name)}$" for t in targets))
    new = attach_for_loading(model, cfg, name=name, targets=targets)
    try:
        with torch.no_grad():
            for t in new.targets:
                with as_adapter(t.layer, name):
                    sink_cls.load_lowrank(t.layer, t.layer._lora_cfg, *pieces[t.name])
    except BaseException:
        detach(model, name=name)
        raise
    return {"name": name, "variant": cfg.variant, "how": how, "rank": rank,
            "layers": {t: {"relative_error": e} for t, e in errors.items()}}
