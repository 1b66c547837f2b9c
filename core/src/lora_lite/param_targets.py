"""Parameter targets: adapt a 2-D or 3-D ``nn.Parameter`` of any module (fused MoE experts).

Current transformers store the routed experts of Qwen3-MoE, Mixtral, OLMoE... as fused 3-D
parameters on one ``*Experts`` module (``gate_up_proj`` (E, 2·inter, hidden), ``down_proj``
(E, hidden, inter)) run by a grouped kernel: there is no nn.Linear per expert to hook. A
parameter target gives every expert its own adapter (rank per expert): each adapter tensor of the
variant's ``param_specs(d_in, d_out, cfg)`` is stored with a leading expert axis, (E, *shape), on
the owning module as ``<spec name>__<parameter name>`` (e.g. ``lora_A__gate_up_proj``).

No module is replaced. A forward pre-hook on the owning module puts W' (the adapted weight,
differentiable in the adapter tensors) in the module's instance ``__dict__`` under the
parameter's name, so that the module's own forward reads W' while the Parameter stays registered
and untouched; a forward hook (``always_call``: also when the forward raises) takes W' away.

W' per expert comes from the variant's weight-space form: its ``param_delta(view, cfg)`` when
it has one (all experts at once: the view's ``lora_*`` tensors are (E, ...) stacks, the delta is
(E, d_out, d_in)), else its ``merged_weight(view, cfg)`` expert by expert (the view is one
expert: ``lora_*`` slices and a (d_out, d_in) ``weight``). A variant with neither, or one that
initialises from the base weight or from data, is refused in one line.

Orientation follows PEFT's ``ParamWrapper``: a 2-D parameter is (d_out, d_in) like nn.Linear; a
3-D one is (E, d_out, d_in), or (E, d_in, d_out) when the module says ``is_transposed = True``
(GPT-OSS). Selection: ``cfg.target_parameters`` regexes (``re.search``) on full parameter names
(``model.layers.0.mlp.experts.gate_up_proj``); ``None`` (the default) means the fused expert
parameters of the model (:func:`default_expert_parameters`) when ``target_names`` is empty too,
else none; ``()`` means none. The router (a 2-D ``weight``) is never a default.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .errors import AttachError
from .routing import OFF as _OFF  # the flag ll.disabled() sets on every adapted module
from .variant import make_tensor

SEP = "__"           # tensor name = f"{spec name}{SEP}{parameter name}"
_HOOKS_ATTR = "_lora_param_hooks"  # the owning module's two hook handles
_PARAMS_ATTR = "_lora_param_targets"


@dataclass
class ParamTarget:
    name: str            # full parameter name: "<module path>.<parameter>"
    module_name: str
    module: nn.Module
    param: str           # the parameter's name on its module
    experts: int         # E (1 for a 2-D parameter)
    d_in: int
    d_out: int
    transposed: bool     # stored (E, d_in, d_out) instead of (E, d_out, d_in)
    ndim: int
    host: nn.Module | None = None  # the module whose call reads the parameter (None: ``module``)

    def tensor_name(self, spec_name: str) -> str:
        return f"{spec_name}{SEP}{self.param}"


def expert_modules(model):
    """(name, module) of every module holding fused expert weights: a module that says how many
    experts it holds (``num_experts``, as transformers' MoE expert modules do) and has 3-D
    floating parameters of that many experts. Other 3-D parameters (a Conv1d kernel, ViT's
    position embeddings) are not experts."""
    for name, module in model.named_modules():
        experts = getattr(module, "num_experts", None)
        if name and isinstance(experts, int) and experts > 1 and any(
                p.dim() == 3 and p.is_floating_point() and p.shape[0] == experts
                for p in module.parameters(recurse=False)):
            yield name, module


def default_expert_parameters(model) -> list[str]:
    """Full names of the routed experts' fused parameters (every 3-D floating parameter: the
    router's 2-D ``weight`` is never one)."""
    return [f"{n}.{p}" for n, m in expert_modules(model)
            for p, t in m.named_parameters(recurse=False)
            if t.dim() == 3 and t.is_floating_point() and t.shape[0] == m.num_experts]


def wanted_patterns(model, cfg) -> tuple:
    """The regexes (or exact full names) that select this config's parameter targets."""
    chosen = getattr(cfg, "target_parameters", None)
    if chosen is None:
        from .plugins import get_variant
        from .targets import variant_default_names
        if cfg.target_names or variant_default_names(model, cfg) or not can_adapt(get_variant(cfg.variant)):
            return ()  # the variant's own placement, or one that cannot: linear layers only
        return tuple(f"^{re.escape(n)}$" for n in default_expert_parameters(model))
    return tuple(chosen)


def find_param_targets(model, cfg) -> list[ParamTarget]:
    from .layers.mha import mha_param_targets  # nn.MultiheadAttention selected by target_names
    found = mha_param_targets(model, cfg)
    names = {pt.name for pt in found}
    return found + [pt for pt in _named_param_targets(model, cfg) if pt.name not in names]


def _named_param_targets(model, cfg) -> list[ParamTarget]:
    patterns = wanted_patterns(model, cfg)
    if not patterns:
        return []
    from .targets import layer_index
    found = []
    for module_name, module in model.named_modules():
        if not module_name:
            continue
        for pname, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}"
            if not any(re.search(p, full) for p in patterns):
                continue
            if any(re.search(p, full) for p in cfg.exclude_names):
                continue
            if cfg.layers is not None and layer_index(full) not in cfg.layers:
                continue
            found.append(make_param_target(module_name, module, pname, param))
    if getattr(cfg, "target_parameters", None) and not found:
        raise AttachError(f"no parameter matched target_parameters={list(cfg.target_parameters)}; "
                          f"fused expert parameters of this model: "
                          f"{default_expert_parameters(model)[:4] or 'none'}")
    return found


def make_param_target(module_name, module, pname, param) -> ParamTarget:
    full = f"{module_name}.{pname}"
    if not param.is_floating_point() or param.dim() not in (2, 3):
        raise AttachError(f"parameter {full!r} has shape {tuple(param.shape)} ({param.dtype}): "
                          "parameter targets are 2-D or 3-D floating parameters")
    transposed = param.dim() == 3 and bool(getattr(module, "is_transposed", False))
    if param.dim() == 2:
        experts, (d_out, d_in) = 1, param.shape
    elif transposed:
        experts, d_in, d_out = param.shape
    else:
        experts, d_out, d_in = param.shape
    return ParamTarget(full, module_name, module, pname, int(experts), int(d_in), int(d_out),
                       transposed, param.dim())


def can_adapt(variant) -> bool:
    return refusal_reason(variant) is None


def check_variant_can(variant, cfg):
    """One-line refusal for a variant that has no weight-space form usable on parameters."""
    why = refusal_reason(variant)
    if why:
        raise AttachError(f"variant {cfg.variant!r} cannot adapt parameter targets ({why}); "
                          "use a variant with merged_weight (e.g. plain low-rank), or "
                          "target_parameters=() to adapt linear layers only")


def refusal_reason(variant):
    why = None
    if variant.param_delta is None and variant.merged_weight is None:
        why = "it has no weight-space form (merged_weight)"
    elif variant.init is not None or variant.needs_calibration:
        why = "it initialises from the base weight or from data, per layer"
    elif variant.group_init is not None:
        why = "it initialises across layers (group_init)"
    return why


def attach_params(model, state, generator) -> None:
    """Create the adapter tensors of ``state.param_targets`` and register their hooks."""
    variant = state.variant
    if state.param_targets:
        check_variant_can(variant, state.cfg)
    from .layers.mha import hosts
    readers = hosts(model)  # an attention's out_proj.weight is read by the attention's call
    by_module: dict = {}
    for pt in state.param_targets:
        if pt.host is None:
            pt.host = readers.get(id(pt.module), pt.module)
        cfg = state.cfg.for_target(pt.name)
        names = state.tensor_names.setdefault(pt.name, [])
        device = getattr(pt.module, pt.param).device
        for spec_name, spec in variant.param_specs(pt.d_in, pt.d_out, cfg).items():
            tname = pt.tensor_name(spec_name)
            if hasattr(pt.module, tname):
                raise AttachError(f"{pt.name}: {pt.module_name} already has {tname!r}; detach first")
            stacked = torch.stack([make_tensor(spec, cfg.dtype, device, generator)
                                   for _ in range(pt.experts)])
            if spec.trainable:
                pt.module.register_parameter(tname, nn.Parameter(stacked))
            else:
                pt.module.register_buffer(tname, stacked, persistent=spec.persistent)
            names.append(tname)
        by_module.setdefault(id(pt.host), (pt.host, []))[1].append((pt, cfg))
    for module, entries in by_module.values():
        module.__dict__[_PARAMS_ATTR] = (variant, entries)
        module.__dict__[_HOOKS_ATTR] = (module.register_forward_pre_hook(_substitute),
                                        module.register_forward_hook(_put_back, always_call=True))


def undo_params(state) -> None:
    for pt in getattr(state, "param_targets", ()):
        module = pt.module
        module.__dict__.pop(pt.param, None)
        module.__dict__.pop(_OFF, None)
        for owner in {id(m): m for m in (module, pt.host) if m is not None}.values():
            owner.__dict__.pop(_PARAMS_ATTR, None)
            for handle in owner.__dict__.pop(_HOOKS_ATTR, ()):
                handle.remove()
        for name in state.tensor_names.get(pt.name, []):
            if name in module._parameters:
                del module._parameters[name]
            elif name in module._buffers:
                del module._buffers[name]
                module._non_persistent_buffers_set.discard(name)


def param_tensors(state) -> dict:
    """'<module path>.<tensor name>' -> tensor for every parameter-target adapter tensor."""
    return {f"{pt.module_name}.{n}": getattr(pt.module, n)
            for pt in getattr(state, "param_targets", ()) for n in state.tensor_names[pt.name]}


class AdapterView:
    """What a variant's math sees of one parameter target: ``lora_*`` tensors (stacked (E, ...)
    or one expert's slice), ``weight`` ((E,) d_out, d_in), ``in_features`` / ``out_features``."""

    def __init__(self, pt, cfg, variant, tensors, weight):
        self.in_features, self.out_features = pt.d_in, pt.d_out
        self.weight, self._lora_cfg, self._lora_variant = weight, cfg, variant
        self._lora_name, self._lora_role = pt.name, "param"
        for name, value in tensors.items():
            setattr(self, name, value)


def stacked_tensors(pt, cfg, variant) -> dict:
    return {s: getattr(pt.module, pt.tensor_name(s))
            for s in variant.param_specs(pt.d_in, pt.d_out, cfg)}


def oriented(pt, weight):
    """The stored parameter as (E, d_out, d_in), whatever its layout (a view, no copy)."""
    w = weight.unsqueeze(0) if pt.ndim == 2 else weight
    return w.transpose(-2, -1) if pt.transposed else w


def stored_layout(pt, w):
    """The inverse of :func:`oriented`."""
    w = w.transpose(-2, -1) if pt.transposed else w
    return w.squeeze(0) if pt.ndim == 2 else w


def adapted_weight(pt, cfg, variant, weight):
    """W' in the parameter's own layout and dtype, differentiable in the adapter tensors."""
    tensors = stacked_tensors(pt, cfg, variant)
    base = oriented(pt, weight)
    if variant.param_delta is not None:
        view = AdapterView(pt, cfg, variant, tensors, base)
        delta = variant.param_delta(view, cfg)
        return weight + stored_layout(pt, delta).to(weight.dtype)
    merged = []
    for e in range(pt.experts):
        view = AdapterView(pt, cfg, variant, {k: v[e] for k, v in tensors.items()}, base[e].float())
        w_e, bias = variant.merged_weight(view, cfg)
        if bias is not None:
            raise AttachError(f"{pt.name}: variant {cfg.variant!r} changes a bias; a parameter "
                              "target has none")
        merged.append(w_e)
    return stored_layout(pt, torch.stack(merged)).to(weight.dtype)


def _substitute(host, args):
    variant, entries = host.__dict__[_PARAMS_ATTR]
    for pt, cfg in entries:  # pt.module: host itself, or the attention's out_proj
        if not pt.module.__dict__.get(_OFF):
            pt.module.__dict__[pt.param] = adapted_weight(pt, cfg, variant,
                                                          pt.module._parameters[pt.param])
    return None


def _put_back(host, args, output):
    entries = host.__dict__.get(_PARAMS_ATTR, (None, ()))[1]
    for pt, _ in entries:
        pt.module.__dict__.pop(pt.param, None)
    return None


def merged_params(state) -> dict:
    """{parameter target name: W' in the parameter's layout and dtype}, nothing changed."""
    out = {}
    with torch.no_grad():
        for pt in getattr(state, "param_targets", ()):
            cfg = state.cfg.for_target(pt.name)
            out[pt.name] = adapted_weight(pt, cfg, state.variant,
                                          pt.module._parameters[pt.param]).detach().clone()
    return out


def write_merged_params(model, merged) -> None:
    """Fold W' into each (detached) parameter in place: the Parameter object is kept."""
    with torch.no_grad():
        for name, weight in merged.items():
            module_name, _, pname = name.rpartition(".")
            model.get_submodule(module_name)._parameters[pname].copy_(weight)


def describe(pt) -> list:
    return [pt.name, pt.experts, pt.d_in, pt.d_out]


def resolve_stored(model, stored, where) -> list[ParamTarget]:
    """The model's parameters named by a file's stored list [[name, E, d_in, d_out], ...]."""
    from .errors import AdapterFileError
    modules = dict(model.named_modules())
    out, seen = [], set()
    for entry in stored:
        if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str)
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in entry[1:])):
            raise AdapterFileError(f"{where}: param_targets entry {str(entry)[:80]!r} is not "
                                   "[name, experts, d_in, d_out]; the file is corrupt")
        name, experts, d_in, d_out = entry
        if name in seen:
            raise AdapterFileError(f"{where}: parameter target {name[:120]!r} is listed twice; "
                                   "the file is corrupt")
        seen.add(name)
        module_name, _, pname = name.rpartition(".")
        module = modules.get(module_name)
        param = module._parameters.get(pname) if module is not None else None
        if param is None:
            raise AdapterFileError(f"{where}: parameter target {name[:120]!r} does not exist in "
                                   "this model; the adapter was made for another model")
        try:
            pt = make_param_target(module_name, module, pname, param)
        except AttachError as e:
            raise AdapterFileError(f"{where}: {e}") from None
        if (pt.experts, pt.d_in, pt.d_out) != (experts, d_in, d_out):
            raise AdapterFileError(f"{where}: shape mismatch at {name[:120]!r}: the adapter expects "
                                   f"{experts} x {d_in}->{d_out}, this model has "
                                   f"{pt.experts} x {pt.d_in}->{pt.d_out}")
        out.append(pt)
    return out


def expected_param_tensors(variant, cfg, param_targets) -> dict:
    """{key: shape} of the persistent parameter-target tensors."""
    out = {}
    for pt in param_targets:
        for s, spec in variant.param_specs(pt.d_in, pt.d_out, cfg.for_target(pt.name)).items():
            if spec.trainable or spec.persistent:
                out[f"{pt.module_name}.{pt.tensor_name(s)}"] = (pt.experts, *spec.shape)
    return out
