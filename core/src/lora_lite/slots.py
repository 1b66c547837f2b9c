"""Per-layer adapter slots: several named adapters' tensors on one layer, and the swap that shows
a variant *its* tensors.

The default adapter's tensors live under the variant's own names (``layer.lora_A``), as always.
A named adapter's live under ``<tensor>__<adapter>`` (``layer.lora_A__math``), registered on the
layer like any tensor (they follow ``model.to`` and are in ``model.parameters()``).
``as_adapter(layer, name)`` moves them under the variant's names for the length of one call
(forward, init, after_load, merged_weight, peft_state, ...), with the default's moved aside and
the scratch attributes (``_lora_cfg``, ...) set to that adapter's; a tensor the variant registers
during the call (e.g. in ``init``) is kept as that adapter's. Variant code is unchanged.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

DEFAULT = "default"
SCRATCH = ("_lora_cfg", "_lora_variant", "_lora_role", "_lora_name", "_lora_probe")
SLOTS = "_lora_slots"
_SWAPPED, _ASIDE, _SAVED = "_lora_swapped", "_lora_aside", "_lora_saved"  # during as_adapter
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


@dataclass
class Slot:
    """One adapter on one layer."""
    name: str
    cfg: object
    variant: type
    role: str
    target: str
    probe: str | None
    attrs: dict = field(default_factory=dict)  # the variant's tensor name -> attribute on the layer


def check_name(name) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or "__" in name:
        raise ValueError(f"adapter name {name!r} is not usable: use letters, digits, '_' or '-' "
                         "(at most 64, starting with a letter, no '__'); the model was not changed")
    return name


def slots(layer) -> dict:
    return layer.__dict__.get(SLOTS) or {}


def stored_name(tensor: str, adapter: str) -> str:
    return tensor if adapter == DEFAULT else f"{tensor}__{adapter}"


def scratch_of(slot) -> dict:
    """The plain attributes (``SCRATCH``) a layer shows for the adapter in ``slot``."""
    return dict(zip(SCRATCH, (slot.cfg, slot.variant, slot.role, slot.target, slot.probe), strict=True))


def set_scratch(layer, slot) -> None:
    layer.__dict__.update(scratch_of(slot))


def _pop(layer, key):
    if key in layer._parameters:
        return ("p", layer._parameters.pop(key), True)
    persistent = key not in layer._non_persistent_buffers_set
    layer._non_persistent_buffers_set.discard(key)
    return ("b", layer._buffers.pop(key), persistent)


def _put(layer, key, entry):
    kind, tensor, persistent = entry
    if kind == "p":
        layer._parameters[key] = tensor
    else:
        layer._buffers[key] = tensor
        if not persistent:
            layer._non_persistent_buffers_set.add(key)


def _adapter_keys(layer):
    return [k for k in list(layer._parameters) + list(layer._buffers) if k.startswith("lora_")]


@contextlib.contextmanager
def as_adapter(layer, name):
    """Inside: ``layer.lora_*`` and ``layer._lora_cfg`` etc. are adapter ``name``'s. Re-entrant:
    a call inside (a forward run from ``group_init``) for another adapter swaps that one in and
    back."""
    current = layer.__dict__.get(_SWAPPED, DEFAULT)
    if current == name:
        yield layer
        return
    if current != DEFAULT:
        _swap_out(layer, current)
    if name != DEFAULT:
        _swap_in(layer, name)
    try:
        yield layer
    finally:
        if name != DEFAULT:
            _swap_out(layer, name)
        if current != DEFAULT:
            _swap_in(layer, current)


def _swap_in(layer, name):
    mine = slots(layer)
    default = mine.get(DEFAULT)
    layer.__dict__[_ASIDE] = {a: _pop(layer, a) for a in (default.attrs.values() if default else ())
                              if a in layer._parameters or a in layer._buffers}
    layer.__dict__[_SAVED] = {k: layer.__dict__.pop(k) for k in SCRATCH if k in layer.__dict__}
    for tensor, attr in mine[name].attrs.items():
        if attr in layer._parameters or attr in layer._buffers:
            _put(layer, tensor, _pop(layer, attr))
    set_scratch(layer, mine[name])
    layer.__dict__[_SWAPPED] = name


def _swap_out(layer, name):
    mine = slots(layer)
    slot = mine[name]
    others = {a for n, s in mine.items() if n not in (name, DEFAULT) for a in s.attrs.values()}
    slot.attrs = {}
    for key in _adapter_keys(layer):
        if key not in others:
            slot.attrs[key] = stored_name(key, name)
            _put(layer, stored_name(key, name), _pop(layer, key))
    for k in SCRATCH:
        layer.__dict__.pop(k, None)
    layer.__dict__.update(layer.__dict__.pop(_SAVED))
    for attr, entry in layer.__dict__.pop(_ASIDE).items():
        _put(layer, attr, entry)
    del layer.__dict__[_SWAPPED]


def call_as(layer, name, fn, *args):
    """``fn(*args)`` with ``layer`` showing adapter ``name`` as inside ``as_adapter``, cheaply (the
    hooks' path, once per adapter and layer each forward): the adapter's tensors and scratch
    attributes are put in the layer's ``__dict__``, which attribute lookup reads before the
    module's parameters and buffers, and taken out after; nothing is moved. A full swap where
    that would show something else: a swap already in place, or a default adapter on the layer
    with a tensor this adapter lacks (the swap hides it)."""
    d = layer.__dict__
    if _SWAPPED in d:
        if d[_SWAPPED] == name:
            return fn(*args)
        with as_adapter(layer, name):
            return fn(*args)
    if name == DEFAULT:
        return fn(*args)  # its tensors and scratch attributes are the layer's own
    shown = _shown(layer, name)
    if shown is None:
        with as_adapter(layer, name):
            return fn(*args)
    saved = {k: d[k] for k in shown if k in d}
    d.update(shown)
    try:
        return fn(*args)
    finally:
        for k in shown:
            del d[k]
        d.update(saved)


def _shown(layer, name) -> dict | None:
    """What ``call_as`` puts in ``layer.__dict__`` for adapter ``name`` (None: swap instead)."""
    mine = slots(layer)
    slot, default = mine[name], mine.get(DEFAULT)
    if default is not None and not default.attrs.keys() <= slot.attrs.keys():
        return None
    params, buffers = layer._parameters, layer._buffers
    shown = scratch_of(slot)
    for tensor, attr in slot.attrs.items():
        value = params[attr] if attr in params else buffers.get(attr)
        if value is None:
            return None
        shown[tensor] = value
    return shown


@contextlib.contextmanager
def as_adapter_everywhere(layers, name):
    with contextlib.ExitStack() as stack:
        for layer in layers:
            stack.enter_context(as_adapter(layer, name))
        yield
