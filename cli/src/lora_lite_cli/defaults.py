"""Per-variant training defaults, asked of the variant (its optional ``train_defaults``).

The CLI keeps no table of variant names: a variant states what it wants in
``train_defaults = {"lr": ..., "targets": (...), "alpha": "r" | float, "calibration": N,
"knobs": {...}}`` (every key optional). What it leaves out comes from the generic row below and
from its config class (its own default r, alpha and target_names).
"""
from __future__ import annotations

import lora_lite as ll
from lora_lite.targets import DEFAULT_TARGET_NAMES

# what a variant that says nothing gets
GENERIC = dict(lr=2e-3, targets=DEFAULT_TARGET_NAMES, calibration=0, knobs={})
KEYS = ("lr", "targets", "alpha", "calibration", "knobs")


def variant_defaults(variant: str) -> dict:
    """Resolved defaults of ``variant``: keys lr, targets, rank, alpha ('r' or a float),
    calibration (training batches given to a data-initialised variant at attach), knobs, and
    ``source`` (which keys the variant gave itself)."""
    row = {k: (dict(v) if isinstance(v, dict) else v) for k, v in GENERIC.items()}
    try:  # a qualified dist:variant name selects that distribution's class
        cls = ll.get_variant(variant)
    except ll.VariantNotInstalled:
        cls = None
    cfg_cls = cls.config if cls is not None else ll.AdapterConfig
    row["rank"], row["alpha"] = cfg_cls.r, float(cfg_cls.alpha)
    if cfg_cls.target_names:
        row["targets"] = tuple(cfg_cls.target_names)
    elif cls is not None and cls.default_target_names is not None:
        row["targets"] = ()  # the variant places itself per architecture at attach (ia3)
    own = (cls.train_defaults if cls is not None else None) or {}
    if not isinstance(own, dict):
        raise TypeError(f"variant {variant!r}: train_defaults must be a dict, not "
                        f"{type(own).__name__}")
    for key, value in own.items():
        if key not in KEYS:
            continue  # unknown keys are ignored (a newer plugin may say more)
        row[key] = tuple(value) if key == "targets" else value
    row["source"] = sorted(k for k in own if k in KEYS)
    return row
