"""combine: several attached adapters -> one new low-rank adapter, as PEFT's
``add_weighted_adapter`` defines it.

The adapters may sit on different layers: the new adapter sits on the union of their layers (in
the model's module order), and at each layer only the adapters present there are combined, with
their own weights, exactly as PEFT does.

Factor-wise (``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the
adapters present at a layer have one rank there; ``cat``: ranks add up): on the adapters'
low-rank factors, read through the variant capability ``lowrank_factors(layer, cfg) -> (A, B,
scale)`` (delta = scale · B A), with PEFT's weights sign·√|w·s| on A and √|w·s| on B. ``svd``: on
weight-space deltas (``merged_weight`` − base, any variant that merges, variants mixed freely),
summed with the weights, then truncated to rank K; the relative Frobenius error per layer is
reported. The new adapter has one rank everywhere (``cat``: the sum of the adapters' largest
ranks; ``svd``: K; otherwise the largest layer rank): a layer that needs fewer is padded with zero
rows of A and zero columns of B (PEFT's ``cat`` layout), which leaves its delta as it is. The
result is an adapter of the installed variant that declares ``load_lowrank(layer, cfg, A, B)`` and
``lowrank_config(rank, target_names)`` (unit scale): core names no variant, it asks the registry
which one takes low-rank factors.
"""
from __future__ import annotations

import math
import re

import torch

from .attach import attach_for_loading, detach, one_adapter, refuse_taken_name
from .errors import AttachError
from .layers.weights import base_dense_weight
from .merge import merge_refusal, merged_weights
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
    for s in states:
        if s.param_targets or s.trainable_modules:
            raise AttachError(f"adapter {s.name!r} adapts parameters or trains whole modules; "
                              "combine works on adapted layers only: leave it out")
        if how == "svd":
            _check_mergeable(s)
        elif s.variant.lowrank_factors is None:
            raise AttachError(f"adapter {s.name!r} ({s.cfg.variant}) has no low-rank factors (at "
                              f"{s.targets[0].name}); combine it with how='svd' (from its "
                              "weight-space delta)")
    return states


def _check_mergeable(state):
    """how='svd' reads weight-space deltas: refuse, naming adapter and layer, one that cannot merge."""
    why = merge_refusal(state.variant)
    if why is None:
        return
    raise AttachError(f"adapter {state.name!r} ({state.cfg.variant}) cannot be merged (at "
                      f"{state.targets[0].name}): {why}; how='svd' combines weight-space deltas, "
                      "so leave it out of the combination")


def _union_targets(model, states):
    """Every layer any of the adapters sits on, once, in the model's module order (PEFT's order,
    which is also the order random pruning draws in)."""
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    seen = {}
    for s in states:
        for t in s.targets:
            seen.setdefault(t.name, t)
    return sorted(seen.values(), key=lambda t: order[t.name])


def _present(states, weights, target):
    """[(state, weight)] of the adapters sitting on ``target``, in the given order."""
    return [(s, w) for s, w in zip(states, weights, strict=True)
            if any(t.name == target.name for t in s.targets)]


def _factors(states, weights, targets, how):
    """{target: [(name, A, B, scale, weight)]} of the adapters present at each target; factor-wise hows
    other than cat refuse unequal ranks at a layer."""
    out = {}
    for t in targets:
        pieces = []
        for s, w in _present(states, weights, t):
            with as_adapter(t.layer, s.name):
                A, B, scale = s.variant.lowrank_factors(t.layer, t.layer._lora_cfg)
            pieces.append((s.name, A.detach().float(), B.detach().float(), float(scale), w))
        first = pieces[0]
        for other in pieces[1:]:
            if how != "cat" and other[1].shape[0] != first[1].shape[0]:
                raise AttachError(
                    f"how={how!r} needs one rank per layer: adapter {other[0]!r} has rank "
                    f"{other[1].shape[0]} at {t.name} where {first[0]!r} has rank "
                    f"{first[1].shape[0]}; use how='svd' or 'cat'")
        out[t.name] = pieces
    return out


def _pad(A, B, rank):
    """(A, B) grown to ``rank`` with zero rows of A and zero columns of B: the same delta B A."""
    k = A.shape[0]
    return (torch.cat([A, A.new_zeros(rank - k, A.shape[1])], dim=0),
            torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1))


def _factorwise(factors, how, density, generator, majority_sign):
    """{target: (A, B)} of the combination at the rank of each layer, unit scale."""
    out = {}
    for target, pieces in factors.items():
        if how == "cat":
            A = torch.cat([a * w * s for _, a, _, s, w in pieces], dim=0)
            out[target] = (A, torch.cat([b for _, _, b, _, _ in pieces], dim=1))
            continue
        ws = [w * s for *_, s, w in pieces]
        wa = [math.copysign(math.sqrt(abs(v)), v if v != 0 else 1.0) for v in ws]
        wb = [math.sqrt(abs(v)) for v in ws]
        A = combine_tensors(how, [p[1] for p in pieces], wa, density, generator, majority_sign)
        B = combine_tensors(how, [p[2] for p in pieces], wb, density, generator, majority_sign)
        out[target] = (A, B)
    return out


def _adapter_rank(state):
    """An adapter's rank as PEFT counts it: its largest r over its layers (0 without a rank)."""
    return max([getattr(state.cfg, "r", 0) or 0] +
               [getattr(state.cfg.for_target(t.name), "r", 0) or 0 for t in state.targets])


def _svd(model, states, weights, targets, rank):
    """{target: (A, B)} rank-``rank`` of Σ w_i ΔW_i over the adapters present at each target (zero
    padded where the layer is narrower than ``rank``), and {target: relative error}."""
    merged = {s.name: merged_weights(model, name=s.name) for s in states}
    out, errors = {}, {}
    for t in targets:
        base = base_dense_weight(t.layer).float()
        delta = sum(w * (merged[s.name][t.name][0] - base) for s, w in _present(states, weights, t))
        U, S, Vh = torch.linalg.svd(delta, full_matrices=True)
        k = min(rank, S.shape[0])
        B, A = U[:, :k] @ torch.diag(S[:k]), Vh[:k, :]
        errors[t.name] = ((delta - B @ A).norm() / delta.norm().clamp_min(1e-30)).item()
        out[t.name] = _pad(A, B, rank)
    return out, errors


def _pieces(model, states, weights, targets, how, rank, density, seed, majority_sign):
    """({target: (A, B)} all of one rank, that rank, {target: relative error} (svd))."""
    if how == "svd":
        if rank is None:  # as PEFT: the largest rank among the adapters
            rank = max(_adapter_rank(s) for s in states) or None
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank={rank!r}: give a positive integer rank")
        pieces, errors = _svd(model, states, weights, targets, rank)
        return pieces, rank, errors
    generator = torch.Generator().manual_seed(seed)
    factors = _factors(states, weights, targets, how)
    pieces = _factorwise(factors, how, density, generator, majority_sign)
    if how == "cat":  # as PEFT: the ranks of all the adapters add up, absent ones are zeros
        rank = sum(max(a.shape[0] for ps in factors.values() for n, a, *_ in ps if n == s.name)
                   for s in states)
    else:
        rank = max(A.shape[0] for A, _ in pieces.values())
    return {t: _pad(A, B, rank) for t, (A, B) in pieces.items()}, rank, {}


def combine(model, names, weights, how="svd", name="combined", rank=None, density=None, seed=0,
            majority_sign="total", sink=None) -> dict:
    """Attach a new adapter ``name`` combining adapters ``names`` with ``weights``, on the union
    of their layers (at each layer, the adapters present there). Returns {"name", "variant",
    "how", "rank", "layers": {target: {"relative_error"}} (svd)}. Every factor is computed before
    anything is attached; a refusal leaves the model unchanged."""
    names, weights = list(names), [float(w) for w in weights]
    states = _check(model, names, weights, how, name, density)
    sink_cls = lowrank_sink(sink)
    targets = _union_targets(model, states)
    pieces, rank, errors = _pieces(model, states, weights, targets, how, rank, density, seed,
                                   majority_sign)
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
