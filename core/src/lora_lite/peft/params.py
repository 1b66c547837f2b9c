"""PEFT interop for parameter targets (``target_parameters``, PEFT's ``lora.ParamWrapper``).

PEFT wraps each targeted parameter's module in a ParamWrapper; several parameters of one module
nest, the first in the module's parameter order innermost. So the tensors of the k-th of n
targeted parameters of module ``m`` are stored under ``base_model.model.m`` + ``.base_layer`` ×
(n - 1 - k) (e.g. ``experts.base_layer.lora_A.weight`` for gate_up_proj, ``experts.lora_A.weight``
for down_proj). adapter_config.json lists the full parameter names in ``target_parameters``
(PEFT matches a name or a dotted suffix). The tensors' own layout is the variant's business:
``peft_param_state(view, cfg)`` / ``load_peft_param_state(view, cfg, tensors)`` on the stacked
view (``lora_lite.param_targets.AdapterView``).
"""
from __future__ import annotations

import os
import re

import torch

from .. import param_targets as _params
from ..attach import DEFAULT, attach_for_loading, attached, detach, refuse_taken_name
from ..errors import AdapterFileError, AttachError, LoraLiteError
from ..file_checks import MAX_TARGETS, short
from ..plugins import get_variant

MODULE_PREFIX = "base_model.model."
NEST = ".base_layer"


def peft_prefixes(param_targets) -> dict:
    """{parameter target name: its key prefix in PEFT's file (without the trailing dot)}."""
    from ..layers.mha import peft_prefix  # nn.MultiheadAttention: PEFT's own layout (lora_lite.layers.mha)
    per_module: dict[str, list] = {}  # module name -> its ParamTargets
    out = {}
    for pt in param_targets:
        if peft_prefix(pt) is not None:
            out[pt.name] = MODULE_PREFIX + str(peft_prefix(pt))
        else:
            per_module.setdefault(pt.module_name, []).append(pt)
    for module_name, pts in per_module.items():
        order = [p for p, _ in pts[0].module.named_parameters(recurse=False)]
        pts = sorted(pts, key=lambda p: order.index(p.param))
        for k, pt in enumerate(pts):
            out[pt.name] = f"{MODULE_PREFIX}{module_name}{NEST * (len(pts) - 1 - k)}"
    return out


def _stacked_view(pt, cfg, variant):
    tensors = _params.stacked_tensors(pt, cfg, variant)
    return _params.AdapterView(pt, cfg, variant, tensors, None)


def export_tensors(state) -> dict:
    """PEFT's tensors of every parameter target of ``state`` (refused when the variant has no
    PEFT form for them)."""
    if not state.param_targets:
        return {}
    variant = state.variant
    if variant.peft_param_state is None:
        raise AttachError(f"variant {state.cfg.variant!r} has no PEFT form for parameter targets "
                          "(peft_param_state); PEFT's target_parameters take plain LoRA only")
    out = {}
    with torch.no_grad():
        for pt in state.param_targets:
            cfg = state.cfg.for_target(pt.name)
            prefix = peft_prefixes(state.param_targets)[pt.name]
            for key, value in variant.peft_param_state(_stacked_view(pt, cfg, variant), cfg).items():
                out[f"{prefix}.{key}"] = value.detach().to("cpu").contiguous().clone()
    return out


def matching_parameters(model, wanted) -> list:
    """ParamTargets PEFT would wrap for ``target_parameters=wanted`` (a name or dotted suffix)."""
    found = []
    for module_name, module in model.named_modules():
        if not module_name:
            continue
        for pname, param in module.named_parameters(recurse=False):
            key = f"{module_name}.{pname}"
            if key in wanted or any(key.endswith(f".{w}") for w in wanted):
                found.append(_params.make_param_target(module_name, module, pname, param))
    return found


def _split_tensors(stored, prefixes, where) -> tuple[dict, dict]:
    """({parameter target: {relative key: tensor}}, {other key: tensor})."""
    per_param: dict[str, dict] = {name: {} for name in prefixes}
    rest = dict(stored)
    for name, prefix in prefixes.items():
        for key in [k for k in rest if k.startswith(prefix + ".")]:
            rel = key[len(prefix) + 1:]
            if not rel.startswith("base_layer."):
                per_param[name][rel] = rest.pop(key)
        if not per_param[name]:
            raise AdapterFileError(f"{where}: no tensors for target parameter {short(name)!r} "
                                   f"(expected keys under {short(prefix)!r})")
    return per_param, rest


def _undo_legacy_out_proj(params, per_param, config) -> None:
    """An attention's out_proj lora_B from a folder PEFT >= 0.22 doubles on load (saved by a PEFT
    that applied it twice) is doubled here too: the adapter computes what PEFT computes."""
    from ..layers.mha import legacy_out_proj_factor, peft_prefix
    factor = legacy_out_proj_factor(config.get("peft_version"))
    for pt in params:
        prefix = peft_prefix(pt)
        if factor != 1.0 and prefix is not None and prefix.endswith(".base_layer.out_proj"):
            per_param[pt.name] = {k: v * factor if k.startswith("lora_B.") else v
                                  for k, v in per_param[pt.name].items()}


def _split_heads(model, saved, rest, where) -> tuple[list, dict]:
    """(full names of the modules_to_save modules, {'<module>.<parameter>': tensor}), popped
    from ``rest``; every parameter of each module must be in the file."""
    from ..trainable_modules import matches
    heads: list[str] = []
    tensors: dict[str, torch.Tensor] = {}
    if not saved:
        return heads, tensors
    for mname, module in model.named_modules():
        if not mname or not matches(mname, saved) or any(mname.startswith(h + ".") for h in heads):
            continue
        for pname, p in module.named_parameters():
            key = f"{MODULE_PREFIX}{mname}.{pname}"
            if key not in rest:
                continue
            value = rest.pop(key)
            if tuple(value.shape) != tuple(p.shape):
                raise AdapterFileError(f"{where}: {short(key)} has shape {tuple(value.shape)}, the "
                                       f"model's has {tuple(p.shape)}")
            tensors[f"{mname}.{pname}"] = value
        if any(f"{mname}.{pname}" in tensors for pname, _ in module.named_parameters()):
            heads.append(mname)
            missing = [p for p, _ in module.named_parameters() if f"{mname}.{p}" not in tensors]
            if missing:
                raise AdapterFileError(f"{where}: modules_to_save {mname!r} lacks {missing[:3]}")
    return heads, tensors


def load_peft_params(model, folder, config, weights) -> dict:
    """ll.load of a PEFT folder whose config has ``target_parameters`` (and maybe
    ``target_modules``); on any failure the model is left as it was."""
    from ..config import config as make_config
    from .load import read_tensors, variant_for
    where = os.path.join(folder, "adapter_config.json")
    wanted = config.get("target_parameters") or []
    if not (isinstance(wanted, list) and all(isinstance(w, str) and w for w in wanted)
            and len(wanted) <= MAX_TARGETS):
        raise AdapterFileError(f"{where}: target_parameters={short(repr(wanted))} is not a list "
                               "of parameter names")
    name, fields = variant_for({k: v for k, v in config.items()
                                if k not in ("target_parameters", "modules_to_save")}, where)
    refuse_taken_name(model, DEFAULT)
    try:
        params = matching_parameters(model, set(wanted))
    except AttachError as e:
        raise AdapterFileError(f"{where}: {e}") from None
    from ..layers.mha import peft_targets
    params += peft_targets(model, weights, where)  # nn.MultiheadAttention modules (lora_lite.layers.mha)
    if wanted and not params:
        raise AdapterFileError(f"{where}: target_parameters {short(wanted[:3])} match no "
                               "parameter of this model; the adapter was made for another model")
    per_param, rest = _split_tensors(read_tensors(weights), peft_prefixes(params), weights)
    _undo_legacy_out_proj(params, per_param, config)
    heads, head_tensors = _split_heads(model, config.get("modules_to_save") or [], rest, where)
    linear = sorted({k[len(MODULE_PREFIX):].rsplit(".", 2)[0] for k in rest})
    if any(not k.startswith(MODULE_PREFIX) for k in rest) or any(
            not k.endswith((".lora_A.weight", ".lora_B.weight")) for k in rest):
        raise AdapterFileError(f"{weights}: tensors {short(sorted(rest)[:3])} belong to no target "
                               "parameter and are no plain LoRA pair of a linear layer")
    try:
        cfg = make_config(name, **fields, target_names=tuple(f"^{re.escape(n)}$" for n in linear),
                          target_parameters=tuple(f"^{re.escape(p.name)}$" for p in params),
                          trainable_modules=tuple(heads),
                          target_roles=(), exclude_names=())
    except LoraLiteError as e:
        raise AdapterFileError(f"{folder}: {short(str(e), 300)}") from None
    variant = get_variant(name)
    if variant.load_peft_param_state is None:
        raise AdapterFileError(f"{where}: variant {name!r} cannot read PEFT's target_parameters "
                               "tensors (no load_peft_param_state)")
    per_linear: dict[str, dict[str, torch.Tensor]] = {n: {} for n in linear}
    for key, value in rest.items():
        module, _, rel = key[len(MODULE_PREFIX):].rpartition(".lora_")
        per_linear[module][f"lora_{rel}"] = value
    try:
        attach_for_loading(model, cfg, param_targets=params)
    except LoraLiteError as e:
        raise AdapterFileError(f"{folder}: {short(str(e), 300)}") from None
    try:
        state = attached(model)
        assert state is not None, "attach just succeeded"
        with torch.no_grad():
            for t in state.targets:
                variant.load_peft_state(t.layer, t.layer._lora_cfg, per_linear[t.name])
            for pt in state.param_targets:
                pcfg = state.cfg.for_target(pt.name)
                variant.load_peft_param_state(_stacked_view(pt, pcfg, variant), pcfg,
                                              per_param[pt.name])
            from ..trainable_modules import trainable_tensors
            for key, tensor in trainable_tensors(state).items():
                tensor.copy_(head_tensors[key])
    except BaseException as e:
        detach(model)
        if isinstance(e, (LoraLiteError, RuntimeError, ValueError, KeyError, TypeError)):
            raise AdapterFileError(f"{folder}: the tensors do not fit variant {name!r}: "
                                   f"{type(e).__name__}: {short(' '.join(str(e).split()), 300)}") from None
        raise
    return {"variant": name, "peft_type": config["peft_type"],
            "targets": len(state.targets) + len(params)}
