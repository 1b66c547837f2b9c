"""attach / detach: adapter tensors registered on the target layers, math run by forward hooks.

No module is replaced. ``attach`` freezes the base, creates the variant's ``lora_*`` tensors on
each target, runs its per-layer ``init``, registers the hooks, then its ``group_init``. If any
step fails, everything done so far is undone and the error re-raised: the model is as before.
``detach`` removes it all and restores any rewritten base weight bit for bit.

Dtypes: adapter tensors are made in ``cfg.dtype`` (fp32 by default, also on fp16/bf16 bases) and
then follow the model (``model.to(dtype)``, ``.half()``); the hooks run the variant's math in the
adapter tensors' current dtype and cast the result to the base output's dtype.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .errors import AttachError
from .layer_kinds import check_layer_kinds
from . import param_targets as _params  # parameter targets (fused MoE experts)
from . import trainable_modules as _heads  # modules trained in full (PEFT's modules_to_save)
from .plugins import get_variant, variant_origin
from .targets import Target, find_targets
from .variant import hook_kind, make_tensor
from .weights import guard_training, restore_base_weight

STATE_ATTR = "_lora_lite_state"
_OFF = "_lora_off"  # set on the target layers inside ``disabled(model)``
_SCRATCH = ("_lora_cfg", "_lora_variant", "_lora_role", "_lora_name", "_lora_probe", _OFF)


@dataclass
class AttachState:
    cfg: object
    variant: type
    targets: list[Target]
    tensor_names: dict = field(default_factory=dict)  # target name -> [attr names]
    handles: list = field(default_factory=list)
    requires_grad: list = field(default_factory=list)  # (param, flag before attach)
    undo_guard: object = None
    param_targets: list = field(default_factory=list)  # lora_lite.param_targets.ParamTarget
    trainable_modules: list = field(default_factory=list)  # lora_lite.trainable_modules


def attached(model) -> AttachState | None:
    return getattr(model, STATE_ATTR, None)


def needs_calibration(variant) -> bool:
    return bool(getattr(variant, "needs_calibration", False))


def attach(model, cfg, calibration_data=None, *, _skip_group_init=False,
           _targets=None, _param_targets=None) -> AttachState:
    """Attach the adapter described by ``cfg`` to ``model`` (in place). Returns its state.

    ``_targets`` (for ``ll.load``): the already resolved target list; ``cfg``'s selection
    regexes are then not run."""
    if attached(model) is not None:
        raise AttachError(f"this model already has a {attached(model).cfg.variant!r} adapter "
                          "attached; call ll.detach(model) first")
    stray = [n for n, m in model.named_modules() if hasattr(m, "_lora_variant")]
    if stray:
        raise AttachError(f"layer {stray[0]!r} carries leftovers of another adapter; "
                          "load a fresh copy of the base model")
    variant = get_variant(cfg.variant)
    if not isinstance(cfg, variant.config):
        raise AttachError(f"config is a {type(cfg).__name__}, variant {cfg.variant!r} needs a "
                          f"{variant.config.__name__}; build it with ll.config({cfg.variant!r}, ...)")
    if needs_calibration(variant) and calibration_data is None and not _skip_group_init:
        raise ValueError(
            f"variant {cfg.variant!r} initialises from data: pass calibration_data=[batch, ...] "
            "to ll.attach (batches as the model takes them, e.g. dicts with input_ids and "
            "attention_mask); the model was not changed")
    params = _params.find_param_targets(model, cfg) if _param_targets is None else list(_param_targets)
    if _targets is not None:
        targets = list(_targets)
    elif params and cfg.target_parameters and not cfg.target_names:
        targets = []  # target_parameters alone: those parameters only (as PEFT)
    else:
        targets = find_targets(model, cfg)
    heads = [_heads.TrainableModule(n, m) for n, m in _heads.find_trainable(model, cfg)]
    targets = [t for t in targets if not _heads.inside(t.name, heads)]  # trained in full instead
    check_layer_kinds(variant, targets)
    state = AttachState(cfg, variant, targets, param_targets=params, trainable_modules=heads)
    setattr(model, STATE_ATTR, state)
    try:
        _attach(model, state, calibration_data, _skip_group_init)
    except BaseException:
        _undo(model, state)
        raise
    return state


def _attach(model, state, calibration_data, skip_group_init):
    cfg, variant = state.cfg, state.variant
    for p in model.parameters():
        state.requires_grad.append((p, p.requires_grad))
        p.requires_grad_(False)
    state.undo_guard = guard_training(model)
    generator = torch.Generator().manual_seed(cfg.seed)
    for t in state.targets:
        layer, names, cfg = t.layer, [], state.cfg.for_target(t.name)  # per-target overrides
        state.tensor_names[t.name] = names
        specs = variant.param_specs(t.d_in, t.d_out, cfg)
        device = _device_of(layer)
        for name, spec in specs.items():
            if not name.startswith("lora_"):
                raise AttachError(f"variant {cfg.variant!r} ({variant_origin(cfg.variant).distribution}) "
                                  f"names a tensor {name!r}: adapter tensor names must start with 'lora_'")
            if hasattr(layer, name):
                raise AttachError(f"{t.name} already has an attribute {name!r}; detach first")
            tensor = make_tensor(spec, cfg.dtype, device, generator)
            if spec.trainable:
                layer.register_parameter(name, torch.nn.Parameter(tensor))
            else:
                layer.register_buffer(name, tensor, persistent=spec.persistent)
            names.append(name)
        layer._lora_cfg, layer._lora_variant = cfg, variant
        layer._lora_role, layer._lora_name = t.role, t.name
        layer._lora_probe = _dtype_probe(specs)
        if callable(getattr(variant, "init", None)):
            variant.init(layer, cfg)
    kind = hook_kind(variant)
    for t in state.targets:
        if "input" in kind:
            state.handles.append(t.layer.register_forward_pre_hook(_input_hook))
        if "output" in kind:
            state.handles.append(t.layer.register_forward_hook(_output_hook))
    _params.attach_params(model, state, generator)
    _heads.attach_trainable(state)
    if callable(getattr(variant, "group_init", None)) and not skip_group_init:
        variant.group_init(model, state.targets, state.cfg, calibration_data)


def _device_of(layer):
    for tensor in list(layer.parameters(recurse=False)) + list(layer.buffers(recurse=False)):
        return tensor.device
    return torch.device("cpu")


def _dtype_probe(specs):
    """The adapter tensor whose dtype the hook's math runs in (a trainable one if any)."""
    names = [n for n, s in specs.items() if s.trainable] or list(specs)
    return names[0] if names else None


def adapter_dtype(layer):
    """The dtype the adapter's tensors have *now*: cfg.dtype at attach, then whatever
    ``model.to(dtype)`` / ``.half()`` / ``.bfloat16()`` made of them (they follow the model)."""
    probe = getattr(layer, layer._lora_probe, None) if layer._lora_probe else None
    return probe.dtype if isinstance(probe, torch.Tensor) else layer._lora_cfg.dtype


def _output_hook(layer, args, y):
    if layer.__dict__.get(_OFF):
        return None  # disabled(): the base output as it is
    # x in the adapter's current dtype (an embedding's indices as they are); the result back in
    # the base output's dtype
    x = args[0]
    x = x.to(adapter_dtype(layer)) if x.is_floating_point() else x
    y_new = layer._lora_variant.forward(layer, x, y)
    return y_new.to(y.dtype)


def _input_hook(layer, args):
    if layer.__dict__.get(_OFF):
        return None
    x = args[0]
    x_new = layer._lora_variant.forward_input(layer, x.to(adapter_dtype(layer)))
    return (x_new.to(x.dtype), *args[1:])


@contextlib.contextmanager
def disabled(model):
    """A block in which the attached adapter's hooks pass inputs and outputs through unchanged:
    the model computes what its current base weights compute (for a variant that rewrote a
    base weight at attach, ``rewrite_base=True``, that is the rewritten weight). The adapter
    tensors stay in place (e.g. to evaluate the base inside an FSDP-wrapped adapted model)."""
    state = attached(model)
    if state is None:
        raise AttachError("no lora-lite adapter is attached to this model")
    layers = [t.layer for t in state.targets] + [pt.module for pt in state.param_targets]
    for layer in layers:
        setattr(layer, _OFF, True)
    trained = _heads.swap_in_originals(state)  # trained heads: their base values inside
    try:
        yield model
    finally:
        trained()
        for layer in layers:
            if _OFF in vars(layer):
                delattr(layer, _OFF)


def detach(model) -> None:
    """Remove the adapter: hooks, tensors, rewritten weights; the base is back bit for bit."""
    state = attached(model)
    if state is None:
        raise AttachError("no lora-lite adapter is attached to this model")
    _undo(model, state)


def _undo(model, state):
    for handle in state.handles:
        handle.remove()
    for t in state.targets:
        layer = t.layer
        restore_base_weight(layer)
        for name in state.tensor_names.get(t.name, []):
            if name in layer._parameters:
                del layer._parameters[name]
            elif name in layer._buffers:
                del layer._buffers[name]
                layer._non_persistent_buffers_set.discard(name)
        for name in _SCRATCH:
            if name in vars(layer):
                delattr(layer, name)
    _params.undo_params(state)
    _heads.undo_trainable(state)
    for p, flag in state.requires_grad:
        p.requires_grad_(flag)
    if state.undo_guard is not None:
        state.undo_guard()
    if STATE_ATTR in vars(model):
        delattr(model, STATE_ATTR)


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """'<module path>.<tensor name>' -> tensor, for every adapter tensor on the model."""
    state = attached(model)
    if state is None:
        raise AttachError("no lora-lite adapter is attached to this model")
    out = {}
    for t in state.targets:
        for name in state.tensor_names[t.name]:
            out[f"{t.name}.{name}"] = getattr(t.layer, name)
    out.update(_params.param_tensors(state))
    return out


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    state = attached(model)
    if state is None:
        raise AttachError("no lora-lite adapter is attached to this model")
    return [p for p in adapter_tensors(model).values()
            if isinstance(p, torch.nn.Parameter) and p.requires_grad] + list(
                _heads.trainable_tensors(state).values())
