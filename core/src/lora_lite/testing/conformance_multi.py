"""The multi-adapter part of ``check_variant``: several named adapters of one variant on one model.

On one base: four adapters (different seeds, moved off their init) attached under names; each,
made active alone, computes what the same adapter saved by name and loaded on a fresh base
computes; a weighted active set is ``y + Σ w_i (f_i − y)`` at a layer; a mixed batch (8 rows,
each its own adapter or none; then every row an adapter, unevenly spaced) equals every row run
alone with its adapter; detaching one leaves
the others as they were; detaching all gives the base bit for bit. A variant that rewrites the
base must be refused next to another adapter (and is then checked for that alone).
"""
from __future__ import annotations

import os
import tempfile

import torch

from ..adapter_file import load, save
from ..attach import attach, detach, trainable_parameters
from ..errors import AttachError
from ..routing import disabled, rows, use, using
from ..variant import hook_kind, rewrites_base
from .testbed import logits, make_batch, snapshot_state, state_equal

NAMES = ("a", "b", "c", "d")
ROWS = ("a", "b", None, "c", "d", "a", None, "b")
# every row an adapter, "a" and "b" on unevenly spaced rows: the other way core routes rows
ROWS_FULL = ("b", "a", "a", "c", "b", "d", "a", "b")


def check_multi(fail, cls, cfg, make_model, calibration_data, tol, rows_tol) -> dict:
    """Figures {"switch_err", "mix_err", "sum_err", "detach_one_err"}; ``fail(reason)`` raises."""
    model = make_model()
    before, batch = snapshot_state(model), make_batch(batch=len(ROWS), seed=3)
    attach(model, cfg, calibration_data=calibration_data, name=NAMES[0])
    if rewrites_base(cls, cfg):
        try:
            attach(model, cfg, calibration_data=calibration_data, name=NAMES[1])
        except AttachError:
            detach(model)
            return {"multi": "refused: the variant rewrites the base"}
        fail("a second adapter was attached next to one that rewrites the base weight; "
             "attach must refuse it")
    for name in NAMES[1:]:
        attach(model, cfg, calibration_data=calibration_data, name=name)
    for i, name in enumerate(NAMES):
        _move_off_init(model, name, seed=10 + i)
    out = {"switch_err": _switching(fail, model, make_model, batch, tol)}
    out["sum_err"] = _weighted_sum(fail, cls, model, batch, tol)
    if cls.mixed_batch:
        out["mix_err"] = _mixed(fail, model, batch, rows_tol)
    with using(model, NAMES[1]):
        kept = logits(model, batch)
    detach(model, name=NAMES[0])
    with using(model, NAMES[1]):
        out["detach_one_err"] = (logits(model, batch) - kept).abs().max().item()
    if out["detach_one_err"] > 0:
        fail(f"detaching one adapter changed another's output by {out['detach_one_err']:.3g}")
    detach(model)
    if not state_equal(snapshot_state(model), before):
        fail("detaching every named adapter does not restore the state_dict bit for bit")
    return out


def _move_off_init(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in trainable_parameters(model, name=name):
            t.add_(0.1 * torch.randn(t.shape, generator=g).to(t.device, t.dtype))


def _switching(fail, model, make_model, batch, tol) -> float:
    """use(name) == the adapter saved by name, loaded alone on a fresh base (and by name)."""
    worst, seen = 0.0, []
    with disabled(model):
        seen.append(logits(model, batch))
    with tempfile.TemporaryDirectory() as folder:
        for name in NAMES:
            path = os.path.join(folder, f"{name}.safetensors")
            save(model, path, name=name)
            use(model, name)
            ours = logits(model, batch)
            if min((ours - other).abs().max().item() for other in seen) <= 10 * tol:
                fail(f"adapter {name!r} computes what the base or another adapter computes after "
                     "moving it off its init: the named adapters are not kept apart")
            seen.append(ours)
            alone = make_model()
            load(alone, path, name=name)
            worst = max(worst, (ours - logits(alone, batch)).abs().max().item())
    use(model, NAMES[0])
    if not worst <= tol:
        fail(f"an adapter made active by name differs from the same adapter saved by name and "
             f"loaded alone: max |logit difference| {worst:.3g} > {tol:g}")
    return worst


def _weighted_sum(fail, cls, model, batch, tol):
    weights = [1.0, 0.5]
    if "input" in hook_kind(cls):
        try:
            use(model, list(NAMES[:2]), weights)
        except AttachError:
            return None  # refused, as documented: an input-changing adapter is active alone
        fail("two input-changing adapters were made active together on the same layers; use() "
             "must refuse it")
    captured = {}
    layer = _first_target(model)
    handle = layer.register_forward_hook(lambda m, a, y: captured.__setitem__("y", y.detach()))
    try:
        with disabled(model):
            model(**batch)
        parts = [captured["y"]]
        for name in NAMES[:2]:
            with using(model, name):
                model(**batch)
            parts.append(captured["y"])
        with using(model, list(NAMES[:2]), weights):
            model(**batch)
        got = captured["y"]
    finally:
        handle.remove()
    y = parts[0]
    want = y + weights[0] * (parts[1] - y) + weights[1] * (parts[2] - y)
    err = (got.float() - want.float()).abs().max().item()
    if not err <= tol:
        fail(f"a weighted active set is not y + sum w_i (f_i - y) at the first target: max "
             f"difference {err:.3g} > {tol:g}")
    return err


def _first_target(model):
    from ..attach import attached
    state = attached(model, NAMES[0])
    assert state is not None, f"check_multi attached {NAMES[0]!r}"
    return state.targets[0].layer


def _mixed(fail, model, batch, tol) -> float:
    """A mixed batch equals each row run alone with its adapter (None: the base)."""
    alone: dict = {}
    worst = 0.0
    for layout in (ROWS, ROWS_FULL):
        with rows(model, layout):
            mixed = logits(model, batch)
        for b, name in enumerate(layout):
            if (b, name) not in alone:
                alone[b, name] = _row_alone(model, batch, b, name)
            worst = max(worst, (mixed[b:b + 1] - alone[b, name]).abs().max().item())
        if not worst <= tol:
            fail(f"a mixed batch (rows {list(layout)}) differs from each row run alone with its "
                 f"adapter: max |logit difference| {worst:.3g} > {tol:g}")
    return worst


def _row_alone(model, batch, b, name):
    row = {k: v[b:b + 1] for k, v in batch.items()}
    with disabled(model) if name is None else using(model, name):
        return logits(model, row)
