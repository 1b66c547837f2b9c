"""merge: fold the attached adapter into the base weights; the model becomes a plain model.

Each variant gives the math (``merged_weight(layer, cfg) -> (W', b')``, fp32, such that the
adapted layer computes x W'ᵀ + b'); core writes it through the layer's weight backend
(requantized on bitsandbytes layers, or, with ``dense=True``, as a new full-precision nn.Linear).
Every merged weight is computed before anything is written, so a refusal or a failing variant
leaves the model attached and untouched. Afterwards there is no hook, no ``lora_*`` tensor and
no snapshot of the old base: merge is final (``ll.attached(model)`` is None).
"""
from __future__ import annotations

import torch
from torch import nn

from . import param_targets as _params  # parameter targets (fused MoE experts)
from .attach import detach, one_adapter, registry
from .errors import AttachError
from .layers.kinds import UNQUANTIZED_KINDS, features
from .layers.weights import backend_for, dense_weight, forget_base_weight
from .slots import as_adapter


def merge_refusal(variant) -> str | None:
    """Why adapters of ``variant`` cannot be merged (it says so, or its plugin has no
    merged_weight), or None when they can: merge, combine(how="svd") and the test bed ask this."""
    if not variant.mergeable:
        return variant.merge_refusal or "it says so"
    if variant.merged_weight is None:
        return "it has no merged_weight (its plugin does not implement merging)"
    return None


def merged_weights(model, name=None) -> dict:
    """{target name: (W', b' or None)} of the attached adapter (``name``, or the only one), fp32;
    nothing is changed."""
    state = one_adapter(model, name, "merge")
    variant = state.variant
    why = merge_refusal(variant)
    if why is not None:
        raise AttachError(f"variant {state.cfg.variant!r} cannot be merged: {why}; the model was not changed")
    out = {}
    with torch.no_grad():
        for t in state.targets:
            with as_adapter(t.layer, state.name):
                weight, bias = variant.merged_weight(t.layer, t.layer._lora_cfg)
            weight = weight.detach().float()
            if tuple(weight.shape) != (t.d_out, t.d_in):
                raise AttachError(f"{t.name}: merged_weight gave shape {tuple(weight.shape)}, the "
                                  f"layer needs {(t.d_out, t.d_in)}; the model was not changed")
            if bias is not None and getattr(t.layer, "bias", None) is None:
                raise AttachError(f"{t.name}: the merged layer has a bias but the base layer has "
                                  "none; the model was not changed")
            out[t.name] = (weight, None if bias is None else bias.detach().float())
    return out


def merge(model, dense: bool = False) -> dict:
    """Fold the adapter into the base and remove it. Returns a report:
    {"variant", "dense", "layers": {name: {"backend", "write_error"}}, "max_write_error"}, where
    write_error = max|W_stored − W'| / max|W'| (0 on fp32, the requantization error on bnb, the
    cast error on bf16/fp16). ``dense=True`` replaces quantized layers by plain nn.Linear layers
    (fp32, or the layer's compute dtype) holding W' exactly."""
    reg = registry(model)
    if reg is not None and len(reg.states) > 1:
        raise AttachError(f"this model has several adapters ({', '.join(reg.states)}); merge folds "
                          "one: ll.detach(model, name=...) the others, or ll.combine them first")
    merged = merged_weights(model)
    state = one_adapter(model, None, "merge")
    merged_params = _params.merged_params(state)
    variant_name = state.cfg.variant
    targets = list(state.targets)
    from .trainable_modules import keep_trained
    keep_trained(state)  # trained heads keep their trained values
    detach(model)
    # hooks, tensors, scratch and snapshots gone; base weights as they were
    _params.write_merged_params(model, merged_params)
    modules = dict(model.named_modules())
    layers = {}
    with torch.no_grad():
        for t in targets:
            weight, bias = merged[t.name]
            layer = modules[t.name]
            if dense and backend_for(layer).name not in UNQUANTIZED_KINDS:
                layer = _replace_by_linear(model, t.name, layer)
            backend, trainable = backend_for(layer), layer.weight.requires_grad
            backend.write(layer, weight)
            forget_base_weight(layer)
            if layer.weight.is_floating_point():
                layer.weight.requires_grad_(trainable)  # as the base had it
            if bias is not None:
                layer.bias.copy_(bias.to(layer.bias.dtype))
            stored = dense_weight(layer)
            err = ((stored - weight).abs().max() / weight.abs().max().clamp_min(1e-30)).item()
            layers[t.name] = {"backend": backend.name, "write_error": err}
    layers.update({name: {"backend": "parameter", "write_error": 0.0} for name in merged_params})
    return {"variant": variant_name, "dense": dense, "layers": layers,
            "max_write_error": max(v["write_error"] for v in layers.values())}


def _replace_by_linear(model, name, layer):
    """A plain nn.Linear in place of a quantized layer (same bias), for a dense merge."""
    dtype = getattr(layer, "compute_dtype", None) or torch.float32
    bias = getattr(layer, "bias", None)
    device = layer.weight.device
    linear = nn.Linear(*features(layer), bias=bias is not None,
                       dtype=dtype, device=device)
    linear.weight.requires_grad_(False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, linear)
    return linear
