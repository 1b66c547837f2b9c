"""In-process plugins and a toy variant, for tests of code that consumes variants (the registry,
the CLI, reports): ``registered(*classes)`` registers variant classes for the duration of a
``with`` block, ``plugin_of(*classes)`` is the plugin object itself, and ``gain_variant(name)``
builds a small well-behaved variant class (y' = y ⊙ g, g = 1 at init) whose members a test can
replace to break one rule of the contract at a time.
"""
from __future__ import annotations

import contextlib
import dataclasses

from ..config import AdapterConfig
from ..plugins import register_plugin, unregister_plugin
from ..plugins.hookspecs import hookimpl
from ..variant import ParamSpec, Variant


def plugin_of(*variant_classes):
    """A plugin object whose ``register_variants`` registers ``variant_classes``."""
    class Plugin:
        @staticmethod
        @hookimpl
        def register_variants(register):
            for cls in variant_classes:
                register(cls)
    return Plugin


@contextlib.contextmanager
def registered(*variant_classes, name="test-plugin", distribution=None):
    """Register ``variant_classes`` through one in-process plugin ``name`` (distribution: the same
    name unless given), and unregister it on leaving, whatever happens inside."""
    register_plugin(plugin_of(*variant_classes), name=name, distribution=distribution or name)
    try:
        yield
    finally:
        unregister_plugin(name)


def _gain_specs(d_in, d_out, cfg):
    return {"lora_g": ParamSpec((d_out,), init="ones")}


def _gain_forward(layer, x, y, cfg):
    return y * layer.lora_g  # y: (..., d_out), lora_g: (d_out,)


def gain_variant(name, *, knobs=None, uses_rank=True, **members):
    """A variant class named ``name``: an output gain y' = y ⊙ g with g (d_out) = 1 at init, so
    exactly the identity. ``knobs`` ({field: default}) become fields of its config (a dataclass
    subclassing AdapterConfig, ``uses_rank`` as given); ``members`` set or replace class members
    (functions become static methods, as every plain def in a Variant body does), e.g.
    ``forward=...`` or ``needs_calibration=True``."""
    fields = [("variant", str, dataclasses.field(default=name))]
    fields += [(k, type(v), dataclasses.field(default=v)) for k, v in (knobs or {}).items()]
    config = dataclasses.make_dataclass(f"{_camel(name)}Config", fields, bases=(AdapterConfig,))
    config.uses_rank = uses_rank
    body = {"name": name, "config": config, "param_specs": _gain_specs, "forward": _gain_forward,
            **members}
    body = {k: v for k, v in body.items() if k != "config"}
    return type(_camel(name), (Variant,), {**body, "config": config})


def _camel(name):
    return "".join(part.capitalize() for part in name.split("_")) or "Toy"
