"""Trainable modules (PEFT's ``modules_to_save``): whole modules trained in full with the adapter.

``cfg.trainable_modules`` names modules as PEFT's modules_to_save does: a module name or a
dotted suffix of one (``"score"`` matches ``score``, ``"classifier"`` matches
``classifier`` and ``encoder.x.classifier``; never a regex). ``None`` (the default) means the task
head of a ``*ForSequenceClassification`` / ``*ForTokenClassification`` model (``score``,
``classifier``: PEFT's SEQ_CLS / TOKEN_CLS defaults), nothing on other models; ``()`` nothing.

At attach their parameters are snapshot (a copy) and made trainable, and they are taken out of
the adapter's linear targets; training updates them in place. ``ll.save`` stores them in the
adapter file (``<module>.<parameter>``, listed in the ``trainable_modules`` metadata), ``ll.load``
copies them in, ``detach`` copies the snapshot back (bit for bit), ``merge`` keeps the trained
values. PEFT export writes them as PEFT does (``base_model.model.<module>.<parameter>`` and
``modules_to_save``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import AttachError

TASK_HEADS = ("classifier", "score")
HEAD_MODELS = ("ForSequenceClassification", "ForTokenClassification")


@dataclass
class TrainableModule:
    name: str
    module: torch.nn.Module
    snapshot: dict = field(default_factory=dict)   # parameter name -> original values (a copy)


def wanted_names(model, cfg) -> tuple:
    chosen = getattr(cfg, "trainable_modules", None)
    if chosen is None:
        return TASK_HEADS if type(model).__name__.endswith(HEAD_MODELS) else ()
    return tuple(chosen)


def matches(name, wanted) -> bool:
    return any(name == w or name.endswith(f".{w}") for w in wanted)


def find_trainable(model, cfg) -> list[tuple[str, torch.nn.Module]]:
    wanted = wanted_names(model, cfg)
    if not wanted:
        return []
    found: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():
        if name and matches(name, wanted) and not any(name.startswith(f + ".") for f, _ in found):
            found.append((name, module))
    if getattr(cfg, "trainable_modules", None) and not found:
        raise AttachError(f"no module matched trainable_modules={list(cfg.trainable_modules)} "
                          "(a module name or a dotted suffix of one, as PEFT's modules_to_save)")
    for name, module in found:
        if not list(module.parameters()):
            raise AttachError(f"trainable module {name!r} has no parameters to train")
        if any(not p.is_floating_point() for p in module.parameters()):
            raise AttachError(f"trainable module {name!r} holds non-float (quantized) parameters; "
                              "train a full-precision head (skip it when quantizing)")
    return found


def inside(target_name, trainable) -> bool:
    return any(target_name == t.name or target_name.startswith(t.name + ".") for t in trainable)


def attach_trainable(state) -> None:
    """Snapshot each trainable module's parameters and make them trainable."""
    for tm in state.trainable_modules:
        for pname, p in tm.module.named_parameters():
            tm.snapshot[pname] = p.detach().clone()
            p.requires_grad_(True)


def undo_trainable(state) -> None:
    with torch.no_grad():
        for tm in state.trainable_modules:
            params = dict(tm.module.named_parameters())
            for pname, original in tm.snapshot.items():
                params[pname].copy_(original)


def swap_in_originals(state):
    """For ``ll.disabled``: the heads' original values in place; returns the undo."""
    current = []
    with torch.no_grad():
        for tm in state.trainable_modules:
            params = dict(tm.module.named_parameters())
            for pname, original in tm.snapshot.items():
                current.append((params[pname], params[pname].detach().clone()))
                params[pname].copy_(original)

    def undo():
        with torch.no_grad():
            for p, value in current:
                p.copy_(value)
    return undo


def trainable_tensors(state) -> dict:
    """'<module>.<parameter>' -> Parameter of every trainable module."""
    return {f"{tm.name}.{pname}": p for tm in getattr(state, "trainable_modules", ())
            for pname, p in tm.module.named_parameters()}


def keep_trained(state) -> None:
    """For merge: the trained values stay (the snapshot becomes the current values)."""
    for tm in state.trainable_modules:
        tm.snapshot = {pname: p.detach().clone() for pname, p in tm.module.named_parameters()}


def describe(state) -> list:
    return [[tm.name, sorted(tm.snapshot)] for tm in state.trainable_modules]
