"""attach / detach: adapter tensors registered on the target layers, math run by forward hooks.

No module is replaced. ``attach`` freezes the base, creates the variant's ``lora_*`` tensors on
each target, runs its per-layer ``init``, registers the hooks, then its ``group_init``. If any
step fails, everything done so far is undone and the error re-raised: the model is as before.
``detach`` removes it all and restores any rewritten base weight bit for bit.

Several adapters may sit on one model, each under a name (``name="math"``; the default name is
``"default"``, whose tensors and file are exactly as with a single adapter). ``lora_lite.slots``
keeps each layer's adapters apart; ``lora_lite.routing`` owns the hooks, the active set and
per-row routing. The first adapter attached is active; later ones wait for ``ll.use``.

Dtypes: adapter tensors are made in ``cfg.dtype`` (fp32 by default, also on fp16/bf16 bases) and
then follow the model (``model.to(dtype)``, ``.half()``); the hooks run the variant's math in the
adapter tensors' current dtype and cast the result to the base output's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from . import param_targets as _params  # parameter targets (fused MoE experts)
from . import trainable_modules as _heads  # modules trained in full (PEFT's modules_to_save)
from .errors import AttachError, CalibrationError
from .layers.kinds import check_layer_kinds
from .layers.weights import guard_training, restore_base_weight
from .plugins import get_variant, variant_origin
from .routing import OFF, ROUTING, Routing, adapter_dtype, disabled, input_hook, output_hook  # noqa: F401
from .slots import (
    DEFAULT,
    SCRATCH,
    SLOTS,
    Slot,
    as_adapter,
    as_adapter_everywhere,
    check_name,
    set_scratch,
    slots,
    stored_name,
)
from .targets import Target, find_targets
from .variant import hook_kind, make_tensor, rewrites_base

if TYPE_CHECKING:
    from .config import AdapterConfig

REGISTRY_ATTR = "_lora_lite_adapters"
_HOOKS = "_lora_hooks"


@dataclass
class AttachState:
    cfg: AdapterConfig
    variant: Any  # the variant class: a duck-typed plugin contract, optional hooks looked up by name
    targets: list[Target]
    tensor_names: dict = field(default_factory=dict)  # target name -> [attribute names on the layer]
    name: str = DEFAULT
    param_targets: list = field(default_factory=list)  # lora_lite.param_targets.ParamTarget
    trainable_modules: list = field(default_factory=list)  # lora_lite.trainable_modules


@dataclass
class Registry:
    """The adapters of one model, by name, and what the first attach changed on the base."""
    states: dict[str, AttachState] = field(default_factory=dict)
    routing: Routing = field(default_factory=Routing)
    requires_grad: list = field(default_factory=list)  # (param, flag before the first attach)
    undo_guard: object = None


def registry(model) -> Registry | None:
    reg = model.__dict__.get(REGISTRY_ATTR)
    return reg if reg is not None and reg.states else None


def attached(model, name=None) -> AttachState | None:
    """The adapter ``name``, or with no name the default one / the only one / the first attached;
    None when there is none."""
    reg = registry(model)
    if reg is None:
        return None
    if name is not None:
        return reg.states.get(name)
    return reg.states.get(DEFAULT) or next(iter(reg.states.values()))


def adapter_names(model) -> list[str]:
    reg = registry(model)
    return list(reg.states) if reg else []


def one_adapter(model, name, doing) -> AttachState:
    """The adapter an operation on one adapter means: ``name``, or the only one."""
    reg = registry(model)
    if reg is None:
        raise AttachError(f"nothing to {doing}: no lora-lite adapter is attached to this model")
    if name is None:
        if len(reg.states) > 1:
            raise AttachError(f"this model has several adapters ({', '.join(reg.states)}); pass "
                              f"name= to say which one to {doing}")
        return next(iter(reg.states.values()))
    if name not in reg.states:
        raise AttachError(f"no adapter named {name!r} on this model (attached: "
                          f"{', '.join(reg.states)})")
    return reg.states[name]


def needs_calibration(variant) -> bool:
    return bool(variant.needs_calibration)


def refuse_taken_name(model, name) -> None:
    """The one refusal of an adapter name the model already holds (attach, load, combine)."""
    reg = registry(model)
    if reg is not None and name in reg.states:
        held = reg.states[name].cfg.variant
        if name == DEFAULT:
            raise AttachError(f"this model already has a {held!r} adapter attached; call "
                              "ll.detach(model) first, or attach under another name=")
        raise AttachError(f"this model already has an adapter named {name!r} ({held!r}); pick "
                          f"another name or ll.detach(model, name={name!r}) first")


def check_can_attach(model, cfg, variant, name) -> None:
    """Refusals before anything is touched: a taken name, leftovers, a base rewrite next to others."""
    check_name(name)
    refuse_taken_name(model, name)
    reg = registry(model)
    if reg is None:
        stray = [n for n, m in model.named_modules()
                 if hasattr(m, "_lora_variant") or SLOTS in vars(m)]
        if stray:
            raise AttachError(f"layer {stray[0]!r} carries leftovers of another adapter; "
                              "load a fresh copy of the base model")
    else:
        rewriting = [s.name for s in reg.states.values() if rewrites_base(s.variant, s.cfg)]
        if rewrites_base(variant, cfg) or rewriting:
            who = rewriting[0] if rewriting else name
            raise AttachError(f"adapter {who!r} rewrites the base weight, so it cannot share a model "
                              "with other adapters; use a separate copy of the base model")


def attach(model, cfg, calibration_data=None, *, name=DEFAULT) -> AttachState:
    """Attach the adapter described by ``cfg`` to ``model`` (in place) under ``name``. Returns
    its state."""
    return _attach_checked(model, cfg, calibration_data, name)


def attach_for_loading(model, cfg, *, name=DEFAULT, targets=None, param_targets=None) -> AttachState:
    """``attach`` for a loader (``ll.load``, PEFT import, ``ll.combine``) whose tensors come from
    elsewhere: no data-driven init runs, so no calibration data is needed. ``targets`` /
    ``param_targets``: already resolved lists (``cfg``'s selection regexes are then not run)."""
    return _attach_checked(model, cfg, None, name, loading=True, targets=targets,
                           param_targets=param_targets)


def _attach_checked(model, cfg, calibration_data, name, loading=False, targets=None,
                    param_targets=None) -> AttachState:
    variant = get_variant(cfg.variant)
    if not isinstance(cfg, variant.config):
        raise AttachError(f"config is a {type(cfg).__name__}, variant {cfg.variant!r} needs a "
                          f"{variant.config.__name__}; build it with ll.config({cfg.variant!r}, ...)")
    check_can_attach(model, cfg, variant, name)
    if needs_calibration(variant) and calibration_data is None and not loading:
        raise CalibrationError(
            f"variant {cfg.variant!r} initialises from data: pass calibration_data=[batch, ...] "
            "to ll.attach (batches as the model takes them, e.g. dicts with input_ids and "
            "attention_mask); the model was not changed")
    targets, params, heads = _select(model, cfg, targets, param_targets)
    check_layer_kinds(variant, targets)
    if (params or heads) and (name != DEFAULT or registry(model) is not None):
        raise AttachError("parameter targets (fused experts) and trainable_modules work for one "
                          "adapter per model for now: attach it alone, under the default name")
    state = AttachState(cfg, variant, targets, name=name, param_targets=params,
                        trainable_modules=heads)
    reg = model.__dict__.get(REGISTRY_ATTR)
    if reg is None or not reg.states:
        reg = Registry()
        model.__dict__[REGISTRY_ATTR] = reg
        _freeze_base(model, reg)
    if not reg.routing.active:
        reg.routing.active = [(name, 1.0)]
    reg.states[name] = state
    try:
        _attach(model, state, reg, calibration_data, loading)
    except BaseException:
        _undo(model, state)
        raise
    return state


def _select(model, cfg, targets, params):
    """The target layers, parameter targets and modules trained in full that ``cfg`` selects
    (``targets`` / ``params``: already resolved, for ``ll.load``)."""
    params = _params.find_param_targets(model, cfg) if params is None else list(params)
    if targets is not None:
        targets = list(targets)
    elif params and cfg.target_parameters and not cfg.target_names:
        targets = []  # target_parameters alone: those parameters only (as PEFT)
    else:
        targets = find_targets(model, cfg)
    heads = [_heads.TrainableModule(n, m) for n, m in _heads.find_trainable(model, cfg)]
    targets = [t for t in targets if not _heads.inside(t.name, heads)]  # trained in full instead
    return targets, params, heads


def _freeze_base(model, reg):
    for p in model.parameters():
        reg.requires_grad.append((p, p.requires_grad))
        p.requires_grad_(False)
    reg.undo_guard = guard_training(model)


def _attach(model, state, reg, calibration_data, skip_group_init):
    variant = state.variant
    generator = torch.Generator().manual_seed(state.cfg.seed)
    for t in state.targets:
        cfg = state.cfg.for_target(t.name)  # per-target overrides
        specs = variant.param_specs(t.d_in, t.d_out, cfg)
        slot = Slot(state.name, cfg, variant, t.role, t.name, _dtype_probe(specs))
        _make_tensors(t, state, specs, generator)
        slot.attrs = {n: stored_name(n, state.name) for n in specs}
        t.layer.__dict__.setdefault(SLOTS, {})[state.name] = slot
        t.layer.__dict__[ROUTING] = reg.routing
        if state.name == DEFAULT:
            set_scratch(t.layer, slot)
        if variant.init is not None:
            with as_adapter(t.layer, state.name):
                variant.init(t.layer, t.layer._lora_cfg)
        _hook(t.layer, hook_kind(variant))
    _params.attach_params(model, state, generator)
    _heads.attach_trainable(state)
    if variant.group_init is not None and not skip_group_init:
        before, reg.routing.active = reg.routing.active, [(state.name, 1.0)]  # as if alone
        try:
            with as_adapter_everywhere([t.layer for t in state.targets], state.name):
                variant.group_init(model, state.targets, state.cfg, calibration_data)
        finally:
            reg.routing.active = before


def _make_tensors(t, state, specs, generator) -> None:
    layer, device = t.layer, _device_of(t.layer)
    names = state.tensor_names.setdefault(t.name, [])  # filled as made: undone on failure
    for name, spec in specs.items():
        if not name.startswith("lora_"):
            raise AttachError(f"variant {state.cfg.variant!r} ({variant_origin(state.cfg.variant).distribution}) "
                              f"names a tensor {name!r}: adapter tensor names must start with 'lora_'")
        attr = stored_name(name, state.name)
        if hasattr(layer, attr):
            raise AttachError(f"{t.name} already has an attribute {attr!r}; detach first")
        tensor = make_tensor(spec, state.cfg.dtype, device, generator)
        if spec.trainable:
            layer.register_parameter(attr, torch.nn.Parameter(tensor))
        else:
            layer.register_buffer(attr, tensor, persistent=spec.persistent)
        names.append(attr)


def _hook(layer, kind):
    """The layer's hooks: one input pre-hook and one output hook at most, for all its adapters."""
    hooks = layer.__dict__.setdefault(_HOOKS, {})
    if "input" in kind and "input" not in hooks:
        hooks["input"] = layer.register_forward_pre_hook(input_hook)
    if "output" in kind and "output" not in hooks:
        hooks["output"] = layer.register_forward_hook(output_hook)


def _device_of(layer):
    for tensor in list(layer.parameters(recurse=False)) + list(layer.buffers(recurse=False)):
        return tensor.device
    return torch.device("cpu")


def _dtype_probe(specs):
    """The adapter tensor whose dtype the hook's math runs in (a trainable one if any)."""
    names = [n for n, s in specs.items() if s.trainable] or list(specs)
    return names[0] if names else None


def detach(model, name=None) -> None:
    """Remove adapter ``name``, or with no name every adapter: hooks, tensors, rewritten weights;
    with none left the base is back bit for bit."""
    reg = registry(model)
    if reg is None:
        raise AttachError("no lora-lite adapter is attached to this model")
    if name is not None:
        _undo(model, one_adapter(model, name, "detach"))
        return
    for state in reversed(list(reg.states.values())):
        _undo(model, state)


def _undo(model, state):
    for t in state.targets:
        _undo_layer(t, state)
    _params.undo_params(state)
    _heads.undo_trainable(state)
    reg = model.__dict__.get(REGISTRY_ATTR)
    if reg is None:
        return
    reg.states.pop(state.name, None)
    reg.routing.active = [(n, w) for n, w in reg.routing.active if n != state.name]
    if reg.states:
        return
    for p, flag in reg.requires_grad:
        p.requires_grad_(flag)
    if reg.undo_guard is not None:
        reg.undo_guard()
    del model.__dict__[REGISTRY_ATTR]


def _undo_layer(t, state):
    layer, mine = t.layer, slots(t.layer)
    slot = mine.pop(state.name, None)
    attrs = set(state.tensor_names.get(t.name, [])) | set(slot.attrs.values() if slot else ())
    for attr in attrs:
        if attr in layer._parameters:
            del layer._parameters[attr]
        elif attr in layer._buffers:
            del layer._buffers[attr]
            layer._non_persistent_buffers_set.discard(attr)
    if state.name == DEFAULT:
        for k in SCRATCH:
            layer.__dict__.pop(k, None)
    if mine:
        _drop_unused_hooks(layer)
        return
    restore_base_weight(layer)
    for handle in layer.__dict__.pop(_HOOKS, {}).values():
        handle.remove()
    for k in (SLOTS, ROUTING, OFF, *SCRATCH):
        layer.__dict__.pop(k, None)


def _drop_unused_hooks(layer):
    kinds = " ".join(hook_kind(s.variant) for s in slots(layer).values())
    hooks = layer.__dict__.get(_HOOKS, {})
    for kind in [k for k in hooks if k not in kinds]:
        hooks.pop(kind).remove()


def adapter_tensors(model, name=None) -> dict[str, torch.Tensor]:
    """'<module path>.<tensor name>' -> tensor: with no name every adapter tensor on the model
    (a named adapter's under their attribute names, ``lora_A__math``); with ``name`` that
    adapter's, under the variant's tensor names (the keys of its file)."""
    reg = registry(model)
    if reg is None:
        raise AttachError("no lora-lite adapter is attached to this model")
    out = {}
    states = [one_adapter(model, name, "list")] if name is not None else list(reg.states.values())
    for state in states:
        for t in state.targets:
            slot = slots(t.layer)[state.name]
            for tensor, attr in slot.attrs.items():
                if attr in state.tensor_names[t.name]:
                    key = tensor if name is not None else attr
                    out[f"{t.name}.{key}"] = getattr(t.layer, attr)
        out.update(_params.param_tensors(state))
    return out


def trainable_parameters(model, name=None) -> list[torch.nn.Parameter]:
    """The adapter parameters that train: every adapter's, or with ``name`` (one or a list) only
    those adapters'. Adapters not named keep their tensors and stay active if they are."""
    names = [name] if isinstance(name, str) else name
    tensors: list[torch.Tensor]
    if names is None:
        tensors = list(adapter_tensors(model).values())  # raises when no adapter is attached
        reg = registry(model)
        assert reg is not None
        states = list(reg.states.values())
    else:
        tensors = [p for n in names for p in adapter_tensors(model, n).values()]
        states = [one_adapter(model, n, "train") for n in names]
    heads = [p for s in states for p in _heads.trainable_tensors(s).values()]
    return [p for p in tensors if isinstance(p, torch.nn.Parameter) and p.requires_grad] + heads


def set_trainable(model, names) -> None:
    """Only the adapters ``names`` (one or a list) get gradients; the others are frozen."""
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        one_adapter(model, n, "train")
    for other in adapter_names(model):
        for p in adapter_tensors(model, other).values():
            if isinstance(p, torch.nn.Parameter):
                p.requires_grad_(other in names)
