"""Target discovery: which linear-like layers of a model get an adapter, and in which role.

Roles, relative to the model width d_model: ``reader`` (d_in == d_model, reads the residual
stream), ``writer`` (d_out == d_model, writes it), ``inner`` (neither). Square layers are named
by convention (q/k/v_proj read, o/out/down_proj write). Name, exclude and layer filters apply
first, so an ambiguous square layer that is not targeted never breaks attach (upstream bug).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .errors import AttachError

_LAYER_INDEX = re.compile(r"\.layers?\.(\d+)\.")
_WRITER_NAMES = ("o_proj", "out_proj", "down_proj", "dense_4h_to_h", "c_proj", "wo", "w2")
_READER_NAMES = ("q_proj", "k_proj", "v_proj", "kq_proj", "qkv_proj", "query", "key", "value")


@dataclass
class Target:
    name: str
    layer: nn.Module
    role: str
    d_in: int
    d_out: int


def is_linear_like(module) -> bool:
    return (hasattr(module, "in_features") and hasattr(module, "out_features")
            and hasattr(module, "weight") and callable(module))


def model_width(model) -> int:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    width = getattr(config, "hidden_size", None)
    if isinstance(width, int):
        return width
    widths = [m.in_features for m in model.modules() if is_linear_like(m)]
    if not widths:
        raise AttachError("this model has no linear-like layers (modules with in_features, "
                          "out_features and weight) to adapt")
    return max(widths)


def layer_index(name):
    m = _LAYER_INDEX.search(f".{name}.")
    return int(m.group(1)) if m else None


def classify(name, d_in, d_out, d_model):
    if d_in == d_model and d_out != d_model:
        return "reader"
    if d_out == d_model and d_in != d_model:
        return "writer"
    if d_in == d_out == d_model:
        leaf = name.rsplit(".", 1)[-1]
        if any(k in leaf for k in _WRITER_NAMES):
            return "writer"
        if any(k in leaf for k in _READER_NAMES):
            return "reader"
        return None  # ambiguous
    return "inner"


def find_targets(model, cfg) -> list[Target]:
    d_model = model_width(model)
    found = []
    for name, module in model.named_modules():
        if not name or not is_linear_like(module):
            continue
        if any(re.search(p, name) for p in cfg.exclude_names):
            continue
        if cfg.target_names and not any(re.search(p, name) for p in cfg.target_names):
            continue
        if cfg.layers is not None and layer_index(name) not in cfg.layers:
            continue
        d_in, d_out = int(module.in_features), int(module.out_features)
        role = classify(name, d_in, d_out, d_model)
        if role is None:
            if cfg.target_roles:
                raise AttachError(
                    f"cannot tell whether square layer {name!r} ({d_in}x{d_out}) reads or writes "
                    "the residual stream; select layers by name with target_names=[...] and "
                    "target_roles=() (any role), or exclude it with exclude_names")
            role = "square"
        if cfg.target_roles and role not in cfg.target_roles:
            continue
        found.append(Target(name, module, role, d_in, d_out))
    if not found:
        raise AttachError(
            f"no layer matched: target_names={list(cfg.target_names)}, "
            f"target_roles={list(cfg.target_roles)}, layers={cfg.layers}, "
            f"exclude_names={list(cfg.exclude_names)}. Check the names with "
            "[n for n, _ in model.named_modules()]")
    return found
