"""The ``lora-lite train`` options, generated from the ``Settings`` fields' ``_flag`` metadata.

``settings_options`` decorates a command ``fn(..., given)``: Typer sees ``fn``'s own parameters
(but ``given``) followed by one option per flagged Settings field; the command receives
``given``, the dict of the values the user gave (None where not given) under the field names.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing

import typer

from ..training.settings import Settings


def _default_text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _option(f: dataclasses.Field, kind):
    meta = f.metadata["cli"]
    if meta["option"] is not None:
        return meta["option"]()
    text = meta["help"]
    if meta["shown"] is not False:
        text += f" (default: {meta['shown'] or _default_text(f.default)})."
    return typer.Option(False if kind is bool else None, *meta["decls"], help=text)


def _cli_type(f: dataclasses.Field, kind):
    if f.metadata["cli"]["cli_type"] is not None:
        return f.metadata["cli"]["cli_type"] | None
    base = kind
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        base = next(a for a in typing.get_args(kind) if a is not type(None))
    base = typing.get_origin(base) or base
    if base is bool:
        return bool
    if base in (tuple, dict, list):
        return list[str] | None
    return base | None


def flagged_fields() -> list[tuple[dataclasses.Field, type]]:
    hints = typing.get_type_hints(Settings)
    return [(f, _cli_type(f, hints[f.name])) for f in dataclasses.fields(Settings) if "cli" in f.metadata]


def given_values(values: dict) -> dict:
    """The settings the user gave (field name -> value, None when not given), parsed."""
    given = {}
    for f, kind in flagged_fields():
        value = values.get(f.name)
        parse = f.metadata["cli"]["parse"]
        if kind is bool:
            value = value or None
        elif value is not None and parse is not None:
            value = parse(value)
        given[f.name] = value
    return given


def settings_options(fn):
    """Add one Typer option per flagged Settings field to ``fn``'s signature (see the module)."""
    own = inspect.signature(fn, eval_str=True)
    params = [p for p in own.parameters.values() if p.name != "given"]
    generated = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=_option(f, kind),
                                   annotation=kind) for f, kind in flagged_fields()]
    taken = {p.name for p in params}
    clash = taken & {p.name for p in generated}
    if clash:
        raise TypeError(f"settings_options: {sorted(clash)} are both parameters and settings")
    head = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]
    signature = own.replace(parameters=head[:1] + generated + head[1:])
    names = {p.name for p in generated}

    @functools.wraps(fn)
    def wrapper(**kwargs):
        values = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        return fn(**kwargs, given=given_values(values))

    wrapper.__signature__ = signature
    wrapper.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    del wrapper.__wrapped__  # Typer must read this signature, not fn's
    return wrapper
