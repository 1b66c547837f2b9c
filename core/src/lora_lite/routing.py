"""The hooks of an adapted layer and which adapters they run: the active set (``ll.use``), their
weights, and per-row routing (``ll.rows``).

One output hook and/or one input pre-hook per target layer, whatever the number of adapters on
it. Active adapters ``a_i`` with weights ``w_i``: one at weight 1 runs as a single adapter always
did (``y' = f(x, y)``); otherwise ``y' = y + Σ w_i (f_i(x, y) − y)``. An input pre-hook changes x
for everything after it, so at most one active adapter per layer may have one, at weight 1.
Rows: row b of the batch runs only its own adapter (or none), computed on that adapter's slice
of the batch, so a mixed batch equals each row run alone.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from .errors import AttachError
from .slots import call_as, slots
from .variant import hook_kind, rewrites_base

OFF = "_lora_off"  # set on the target layers inside ``disabled(model)``
ROUTING = "_lora_routing"


@dataclass
class Routing:
    """Shared by every adapted layer of one model."""
    active: list = field(default_factory=list)  # [(name, weight)]
    rows: dict | None = None                    # name -> row indices (a list), in ``ll.rows``
    batch: int = 0
    _plans: dict = field(default_factory=dict)  # (layer id, hook, device) -> LayerRows, in ``ll.rows``

    def layer_rows(self, layer, hook: str, device) -> LayerRows:
        """Which rows each adapter on ``layer`` with a ``hook`` ("output"/"input") runs on
        ``device``: worked out once per ``ll.rows`` block (the hooks run it every forward)."""
        key = (id(layer), hook, device)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = LayerRows.make(layer, hook, self.rows or {}, self.batch, device)
        return plan


@dataclass
class LayerRows:
    """One layer's share of an ``ll.rows`` block, for one hook."""
    parts: list    # [(adapter name, rows: a slice where they are evenly spaced, else an index tensor)]
    whole: str | None  # the adapter running every row, if one does: its plain, unrouted path
    covered: bool  # every row runs an adapter here (the output starts empty, not as a copy)

    @classmethod
    def make(cls, layer, hook, rows, batch, device):
        mine = slots(layer)
        parts = [(n, _selector(i, device)) for n, i in rows.items()
                 if n in mine and hook in hook_kind(mine[n].variant)]
        covered = sum(len(rows[n]) for n, _ in parts) == batch
        return cls(parts, parts[0][0] if covered and len(parts) == 1 else None, covered)


def _selector(indices: list, device):
    """Rows ``indices`` (ascending) as a slice when evenly spaced (a view: nothing gathered),
    else as an index tensor on ``device``."""
    step = indices[1] - indices[0] if len(indices) > 1 else 1
    if step > 0 and indices == list(range(indices[0], indices[-1] + 1, step)):
        return slice(indices[0], indices[-1] + 1, step)
    return torch.tensor(indices, dtype=torch.long, device=device)


def adapter_dtype(layer):
    """The dtype the adapter's tensors have *now*: cfg.dtype at attach, then whatever
    ``model.to(dtype)`` / ``.half()`` / ``.bfloat16()`` made of them (they follow the model)."""
    probe = getattr(layer, layer._lora_probe, None) if layer._lora_probe else None
    return probe.dtype if isinstance(probe, torch.Tensor) else layer._lora_cfg.dtype


def _output(layer, x, y):
    x = x.to(adapter_dtype(layer)) if x.is_floating_point() else x  # an embedding's indices
    return layer._lora_variant.forward(layer, x, y, layer._lora_cfg).to(y.dtype)


def _input(layer, x):
    return layer._lora_variant.forward_input(layer, x.to(adapter_dtype(layer)), layer._lora_cfg).to(x.dtype)


def _run_output(layer, name, x, y):
    return call_as(layer, name, _output, layer, x, y)


def _run_input(layer, name, x):
    return call_as(layer, name, _input, layer, x)


def _has(layer, name, kind):
    return kind in hook_kind(slots(layer)[name].variant)


def _check_batch(layer, plan, n):
    if n != plan.batch:
        target = next(iter(slots(layer).values())).target
        raise AttachError(f"{target}: ll.rows assigned {plan.batch} rows, this forward has a batch "
                          f"of {n}; give one adapter (or None) per row of the batch")


def _routed(layer, plan, hook, t, run):
    """``t`` (y for the output hook, x for the input one) with each adapter's rows replaced by
    ``run(name, rows)``; None where no adapter runs here."""
    _check_batch(layer, plan, t.shape[0])
    here = plan.layer_rows(layer, hook, t.device)
    if here.whole is not None:
        return run(here.whole, slice(None))
    if not here.parts:
        return None
    out = torch.empty_like(t) if here.covered else t.clone()
    for name, sel in here.parts:
        out[sel] = run(name, sel)
    return out


def output_hook(layer, args, y):
    if layer.__dict__.get(OFF):
        return None  # disabled(): the base output as it is
    plan, x = layer.__dict__[ROUTING], args[0]
    if plan.rows is not None:
        return _routed(layer, plan, "output", y, lambda n, sel: _run_output(layer, n, x[sel], y[sel]))
    run = [(n, w) for n, w in plan.active if n in slots(layer) and _has(layer, n, "output")]
    if len(run) == 1 and run[0][1] == 1.0:
        return _run_output(layer, run[0][0], x, y)
    total = None
    for name, w in run:
        delta = w * (_run_output(layer, name, x, y) - y)
        total = y + delta if total is None else total + delta
    return total


def input_hook(layer, args):
    if layer.__dict__.get(OFF):
        return None
    plan, x = layer.__dict__[ROUTING], args[0]
    if plan.rows is not None:
        out = _routed(layer, plan, "input", x, lambda n, sel: _run_input(layer, n, x[sel]))
        return None if out is None else (out, *args[1:])
    run = [n for n, _ in plan.active if n in slots(layer) and _has(layer, n, "input")]
    for name in run:
        x = _run_input(layer, name, x)
    return (x, *args[1:]) if run else None


# -- choosing -------------------------------------------------------------------------------

def _registry(model):
    from .attach import registry
    reg = registry(model)
    if reg is None:
        raise AttachError("no lora-lite adapter is attached to this model")
    return reg


def _known(reg, names):
    for n in names:
        if n not in reg.states:
            raise AttachError(f"no adapter named {n!r} on this model (attached: "
                              f"{', '.join(reg.states)}); the active set was not changed")


def active_plan(model, names, weights=None) -> list:
    """[(name, weight)] for ``ll.use``, checked; nothing is changed."""
    reg = _registry(model)
    names = [names] if isinstance(names, str) else list(names)
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"{len(names)} adapters but {len(weights)} weights; give one weight each")
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names repeat in {names}; name each once")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights}; the active set was not changed")
    _known(reg, names)
    inputs = [n for n in names if "input" in hook_kind(reg.states[n].variant)]
    for n, w in zip(names, weights, strict=True):
        if n in inputs and (w != 1.0 or _shares_layer(reg, inputs, n)):
            raise AttachError(f"adapter {n!r} ({reg.states[n].cfg.variant}) changes its layers' "
                              "input; it can be active only alone among input-changing adapters "
                              "on a layer and at weight 1")
    return list(zip(names, weights, strict=True))


def _shares_layer(reg, inputs, name):
    mine = {t.name for t in reg.states[name].targets}
    return any(mine & {t.name for t in reg.states[o].targets} for o in inputs if o != name)


def use(model, names, weights=None) -> None:
    """Make ``names`` (one name or a list) the active adapters, with ``weights`` (default 1 each);
    an empty list: none (the base, with every adapter kept in place)."""
    plan = active_plan(model, names, weights)
    _registry(model).routing.active = plan


@contextlib.contextmanager
def using(model, names, weights=None):
    """``ll.use`` for the length of a block; the previous active set afterwards."""
    routing = _registry(model).routing
    before = list(routing.active)
    use(model, names, weights)
    try:
        yield model
    finally:
        routing.active = before


@contextlib.contextmanager
def rows(model, adapter_per_row):
    """A block in which row b of every batch runs adapter ``adapter_per_row[b]`` (None: the base)
    alone; works with ``model.generate`` (the batch keeps its rows)."""
    reg = _registry(model)
    names = list(adapter_per_row)
    if not names:
        raise ValueError("adapter_per_row is empty; give one adapter name (or None) per row")
    _known(reg, sorted({n for n in names if n is not None}))
    for n in sorted({n for n in names if n is not None}):
        state = reg.states[n]
        if rewrites_base(state.variant, state.cfg) or not state.variant.mixed_batch:
            raise AttachError(f"adapter {n!r} ({state.cfg.variant}) cannot share a batch with other "
                              "rows (it rewrites the base weight or its variant says mixed_batch=False); "
                              "run its rows on their own")
    index = {}
    for b, n in enumerate(names):
        if n is not None:
            index.setdefault(n, []).append(b)
    routing = reg.routing
    routing.rows, routing.batch, routing._plans = index, len(names), {}
    try:
        yield model
    finally:
        routing.rows, routing.batch, routing._plans = None, 0, {}


def forward_mixed(model, batch, adapter_per_row):
    """One forward of ``batch`` (a dict of model inputs, or a tensor) with row b using
    ``adapter_per_row[b]`` (None: the base)."""
    with rows(model, adapter_per_row):
        return model(**batch) if isinstance(batch, dict) else model(batch)


@contextlib.contextmanager
def disabled(model):
    """A block in which the adapters' hooks pass inputs and outputs through unchanged: the model
    computes what its current base weights compute (for a variant that rewrote a base weight at
    attach, ``rewrite_base=True``, that is the rewritten weight). The adapter tensors stay in
    place (e.g. to evaluate the base inside an FSDP-wrapped adapted model)."""
    from .trainable_modules import swap_in_originals
    reg = _registry(model)
    layers = {id(t.layer): t.layer for s in reg.states.values() for t in s.targets}
    layers.update({id(pt.module): pt.module for s in reg.states.values() for pt in s.param_targets})
    layers = list(layers.values())
    for layer in layers:
        setattr(layer, OFF, True)
    put_back = [swap_in_originals(s) for s in reg.states.values()]  # trained heads: the base's
    try:
        yield model
    finally:
        for undo in put_back:
            undo()
        for layer in layers:
            if OFF in vars(layer):
                delattr(layer, OFF)
