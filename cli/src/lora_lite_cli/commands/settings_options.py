"""Command options generated from the ``Settings`` fields' ``_flag`` metadata: each flag and its
default are declared once, on the field.

``settings_options`` decorates a command ``fn(..., given)``: Typer sees ``fn``'s own parameters
(but ``given``) followed by one option per flagged Settings field; the command receives
``given``, the dict of the values the user gave (None where not given) under the field names.
``train`` takes every flagged field; ``shared_settings_options(names, overrides)`` takes only
``names``, for a command that shares some of train's flags (``eval``), where ``overrides`` may
add aliases or reword a flag's help for that command.
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


def _option(f: dataclasses.Field, kind, override: dict | None = None):
    """The field's Typer option; ``override`` (a command's own wording): ``aliases`` added to
    the flag's spellings, ``help`` / ``shown`` / ``option`` replacing the field's."""
    override = dict(override or {})
    aliases = override.pop("aliases", ())
    meta = {**f.metadata["cli"], **override}
    if meta["option"] is not None:
        return meta["option"]()
    text = meta["help"]
    if meta["shown"] is not False:
        text += f" (default: {meta['shown'] or _default_text(f.default)})."
    return typer.Option(False if kind is bool else None, *meta["decls"], *aliases, help=text)


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


def flagged_fields(names=None) -> list[tuple[dataclasses.Field, type]]:
    """(field, option type) of every flagged Settings field, or of those in ``names``."""
    hints = typing.get_type_hints(Settings)
    flagged = [f for f in dataclasses.fields(Settings) if "cli" in f.metadata]
    if names is not None:
        unknown = set(names) - {f.name for f in flagged}
        if unknown:
            raise TypeError(f"settings_options: {sorted(unknown)} are no flagged settings")
        flagged = [f for f in flagged if f.name in names]
    return [(f, _cli_type(f, hints[f.name])) for f in flagged]


def with_defaults(given: dict, keep_none=()) -> dict:
    """``given`` with each value not given replaced by its field's default (but ``keep_none``)."""
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    return {k: v if v is not None or k in keep_none else fields[k].default for k, v in given.items()}


def given_values(values: dict, names=None) -> dict:
    """The settings the user gave (field name -> value, None when not given), parsed."""
    given = {}
    for f, kind in flagged_fields(names):
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
    return _with_options(fn, None, {})


def shared_settings_options(names, overrides: dict | None = None):
    """A decorator adding the options of the Settings fields ``names`` only; ``overrides``:
    {field name: {"aliases": (...), "help": ..., "shown": ..., "option": maker}}."""
    return functools.partial(_with_options, names=tuple(names), overrides=dict(overrides or {}))


def _with_options(fn, names, overrides):
    own = inspect.signature(fn, eval_str=True)
    params = [p for p in own.parameters.values() if p.name != "given"]
    generated = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                                   default=_option(f, kind, overrides.get(f.name)))
                 for f, kind in flagged_fields(names)]
    taken = {p.name for p in params}
    clash = taken & {p.name for p in generated}
    if clash:
        raise TypeError(f"settings_options: {sorted(clash)} are both parameters and settings")
    head = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]
    signature = own.replace(parameters=head[:1] + generated + head[1:])
    flags = {p.name for p in generated}
    if set(overrides) - flags:
        raise TypeError(f"settings_options: overrides for {sorted(set(overrides) - flags)}, not among the options")

    @functools.wraps(fn)
    def wrapper(**kwargs):
        values = {k: kwargs.pop(k) for k in list(kwargs) if k in flags}
        return fn(**kwargs, given=given_values(values, names))

    wrapper.__signature__ = signature
    wrapper.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    del wrapper.__wrapped__  # Typer must read this signature, not fn's
    return wrapper
