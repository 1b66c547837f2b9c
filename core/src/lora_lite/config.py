"""Adapter configs: a base dataclass that each variant subclasses with its own typed knobs.

Validation runs at construction and raises ``ConfigError`` (a ValueError) naming the field. A
variant's own fields are checked from their annotations (bool, int, float: finite in float32,
str) and from what ``knob(default, "[lo, hi)", choices=..., why=...)`` declares once in the
field; ``validate()`` is left for rules between fields.
Configs round-trip through JSON (``to_dict``/``from_dict``); tuples come back as tuples.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from .errors import ConfigError

ROLES = ("reader", "writer", "inner")
_NOT_OVERRIDABLE = ("variant", "overrides", "dtype", "target_roles", "target_names",
                    "exclude_names", "layers", "target_parameters", "trainable_modules")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1 (negatives wrap: refused)


@dataclass
class AdapterConfig:
    """Fields every variant has. Subclasses set ``variant``'s default to their variant name."""

    variant: str = ""
    r: int = 8                      # rank (variants that have none ignore it)
    alpha: float = 16.0             # LoRA scale s = alpha / r, where the variant uses one
    dtype: torch.dtype = torch.float32  # dtype of adapter tensors and of the hook's math
    target_roles: tuple = ()        # opt-in filter: subset of ROLES; () = any role
    target_names: tuple = ()        # regexes (re.search) on module names; () = the variant's
                                    # default_target_names, else every linear-like layer but
                                    # the output head ("all-linear", see lora_lite.targets)
    exclude_names: tuple = ()       # regexes of layers never to adapt
    layers: tuple | None = None     # transformer block indices to adapt; None = all
    seed: int = 0                   # seeds the random init of adapter tensors
    overrides: tuple = ()           # ((regex on module name, {field: value}), ...): per target
    target_parameters: tuple | None = None  # regexes on full parameter names (fused MoE experts,
                                    # lora_lite.param_targets); None = the model's fused expert
                                    # parameters when target_names is empty too; () = none
    trainable_modules: tuple | None = None  # modules trained in full and saved (PEFT's
                                    # modules_to_save: names or dotted suffixes); None = the task
                                    # head of a *ForSequence/TokenClassification model; () = none

    uses_rank: ClassVar[bool] = True

    def __post_init__(self):
        self.dtype = _as_dtype(self.dtype)
        for name in ("target_roles", "target_names", "exclude_names"):
            setattr(self, name, _as_tuple(name, getattr(self, name), "a list of strings"))
        if self.target_parameters is not None:
            self.target_parameters = _as_tuple("target_parameters", self.target_parameters,
                                               "a list of regexes on parameter names, or None")
        if self.trainable_modules is not None:
            self.trainable_modules = _as_tuple("trainable_modules", self.trainable_modules,
                                               "a list of module names, or None")
        if self.layers is not None:
            if isinstance(self.layers, int):
                self.layers = (self.layers,)
            self.layers = _as_tuple("layers", self.layers,
                                    "a list of non-negative layer indices, or None for all")
        self.validate()

    def validate(self):
        """Check field values; subclasses extend it (call super().validate())."""
        _check(self.variant and isinstance(self.variant, str), "variant", self.variant,
               "a variant name; build configs with ll.config(name, ...)")
        if self.uses_rank:
            _check(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0,
                   "r", self.r, "a positive integer")
        scale_ok = is_finite_number(self.alpha) and (not self.uses_rank or is_finite_number(self.scale))
        _check(scale_ok, "alpha", self.alpha, "a finite number (alpha / r must fit in float32)")
        _check(self.dtype.is_floating_point, "dtype", self.dtype, "a floating dtype")
        bad = [r for r in self.target_roles if r not in ROLES]
        _check(not bad, "target_roles", self.target_roles, f"a subset of {ROLES}")
        for name in ("target_names", "exclude_names"):
            _check_patterns(name, getattr(self, name))
        _check_patterns("target_parameters", self.target_parameters or ())
        _check(all(isinstance(n, str) and n for n in self.trainable_modules or ()),
               "trainable_modules", self.trainable_modules, "a list of module names (strings)")
        if self.layers is not None:
            _check(all(_is_int(i) and i >= 0 for i in self.layers), "layers",
                   self.layers, "a list of non-negative layer indices, or None for all")
        _check(_is_int(self.seed) and 0 <= self.seed <= MAX_SEED, "seed", self.seed,
               "an integer in [0, 2**64 - 1] (the range of torch.Generator seeds)")
        check_fields(self)
        self._check_overrides()

    def _check_overrides(self):
        pairs = _as_tuple("overrides", self.overrides, "(regex on module name, {field: value}) pairs")
        self.overrides = tuple(tuple(pair) if isinstance(pair, (list, tuple)) else pair
                               for pair in pairs)
        allowed = {f.name for f in fields(self)} - set(_NOT_OVERRIDABLE)
        for pair in self.overrides:
            _check(isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[1], dict),
                   "overrides", pair, "(regex on module name, {field: value}) pairs")
            pattern, values = pair
            _check_patterns("overrides", (pattern,))
            bad = sorted(set(values) - allowed)
            _check(not bad, f"overrides[{pattern!r}]", bad,
                   f"per-target fields among {sorted(allowed)}")
            _check_override_values(self, pattern, values)

    def for_target(self, name: str) -> AdapterConfig:
        """This config as it applies to the layer ``name``: for each field, the first
        ``overrides`` pair whose regex is found in the name sets it (as PEFT's rank_pattern and
        alpha_pattern do). Without a match, ``self``. A config loaded from a file answers from
        the file's resolved per-target list instead (``with_resolved_targets``): no regex runs."""
        resolved = self.__dict__.get(_RESOLVED)
        if resolved is not None and name in resolved:
            return resolved[name]
        merged = {}
        for pattern, values in self.overrides:
            if re.search(pattern, name):
                merged.update({k: v for k, v in values.items() if k not in merged})
        return dataclasses.replace(self, overrides=(), **merged) if merged else self

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.dtype):
                value = str(value).removeprefix("torch.")
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> AdapterConfig:
        """Rebuild a config; on the base class, the subclass is found from ``d['variant']``."""
        target = cls
        if cls is AdapterConfig:
            target = _variant_class(d.get("variant", "")).config
        known = {f.name: f for f in fields(target)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown} for variant "
                              f"{d.get('variant')!r}; known fields: {sorted(known)}")
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return target(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def knobs(cls) -> dict:
        """The fields this variant adds to AdapterConfig, with their defaults."""
        base = {f.name for f in fields(AdapterConfig)}
        return {f.name: _default(f) for f in fields(cls) if f.name not in base}


# name -> variant class. The registry (lora_lite.plugins, which imports this module) installs it,
# so this module never imports the registry: config <- plugins, one way only.
_lookup_variant = None


def set_variant_lookup(lookup):
    global _lookup_variant
    _lookup_variant = lookup


def _variant_class(name):
    if _lookup_variant is None:
        raise RuntimeError("lora_lite.plugins is not loaded: import lora_lite first")
    return _lookup_variant(name)


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _as_dtype(value):
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.removeprefix("torch.")]
    raise ConfigError(f"dtype: {value!r} is not one of {sorted(_DTYPES)}")


_RESOLVED = "_resolved_targets"  # instance attribute, not a field: ignored by ==, to_dict, replace


def with_resolved_targets(cfg, per_target: dict) -> AdapterConfig:
    """``cfg``, answering ``for_target(name)`` from ``per_target`` ({name: config}) for those
    names, so that a file's stored override regexes are never run (see ll.load)."""
    object.__setattr__(cfg, _RESOLVED, dict(per_target))
    return cfg


def _check_override_values(cfg, pattern, values):
    """The config an override gives a target must itself be valid (checked now, not at attach)."""
    try:
        dataclasses.replace(cfg, overrides=(), **values)
    except ConfigError as e:
        raise ConfigError(f"overrides: {pattern!r} sets {e}") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """A real number (bool excluded) that stays finite in float32: not NaN, not infinite, and
    |value| <= float32's max (a larger one becomes inf in the hook and inf * 0 = NaN)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and abs(value) <= FLOAT32_MAX)


KNOB = "lora_lite.knob"  # the field-metadata key knob() sets
_INTERVAL = re.compile(r"^([\[(])\s*([^,]+?)\s*,\s*([^,]+?)\s*([\])])$")


@dataclass(frozen=True)
class Knob:
    """What ``knob`` declared of a field: an interval, allowed values, a reason."""

    within: str | None = None
    choices: tuple | None = None
    why: str = ""
    bounds: tuple = (-math.inf, False, math.inf, False)  # (lo, lo closed, hi, hi closed)

    def holds(self, value) -> bool:
        if self.choices is not None and value not in self.choices:
            return False
        if self.within is None:
            return True
        lo, lo_closed, hi, hi_closed = self.bounds
        above = value >= lo if lo_closed else value > lo
        return above and (value <= hi if hi_closed else value < hi)


def _bound(text: str, where: str) -> float:
    table = {"inf": math.inf, "-inf": -math.inf, "pi": math.pi}
    if text in table:
        return table[text]
    base, _, power = text.partition("**")
    try:
        return int(base) ** int(power) if power else (int(text) if text.lstrip("-").isdigit() else float(text))
    except ValueError:
        raise ValueError(f"knob({where}): bound {text!r} is not a number, inf or pi") from None


def knob(default, within: str | None = None, *, choices=None, why: str = ""):
    """A config field whose valid values are declared once, next to its default:
    ``dropout: float = ll.knob(0.0, "[0, 1)")``, ``quant_iters: int = ll.knob(1, "[0, 20]")``,
    ``mode: str = ll.knob("a", choices=("a", "b"))``. The annotation gives the kind (bool, int,
    float, str; ``| None`` allows None), ``within`` an interval in the usual notation (bounds:
    numbers, ``2**63``, ``inf``, ``pi``), ``why`` a reason added to the error message. A bad
    value is a one-line ConfigError: ``dropout: got 1.5, expected a finite number in [0, 1)``."""
    bounds = Knob.bounds
    if within is not None:
        match = _INTERVAL.match(within)
        if match is None:
            raise ValueError(f"knob({within!r}): write the interval as [lo, hi], (lo, hi), [lo, hi) or (lo, hi]")
        left, lo, hi, right = match.groups()
        bounds = (_bound(lo, within), left == "[", _bound(hi, within), right == "]")
    spec = Knob(within, tuple(choices) if choices is not None else None, why, bounds)
    return dataclasses.field(default=default, metadata={KNOB: spec})


_KINDS = {  # annotation -> (is this value of the kind, what the message calls it)
    "bool": (lambda v: isinstance(v, bool), "True or False"),
    "int": (lambda v: _is_int(v), "an integer"),
    "float": (lambda v: is_finite_number(v), "a finite number"),
    "str": (lambda v: isinstance(v, str), "a string"),
}


def _annotation(f) -> tuple[str, bool]:
    """(kind name, None allowed) of a field's annotation, string or type."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    parts = [p.strip() for p in text.replace("Optional[", "").rstrip("]").split("|")]
    optional = "None" in parts
    kinds = [p for p in parts if p != "None"]
    return (kinds[0] if len(kinds) == 1 else text), optional


def check_fields(cfg) -> None:
    """Check every field a variant adds to AdapterConfig against its annotation and ``knob``
    declaration (fields of other kinds, e.g. tuples, are the variant's own validate()'s)."""
    base = {f.name for f in fields(AdapterConfig)}
    for f in fields(cfg):
        if f.name in base:
            continue
        kind, optional = _annotation(f)
        value = getattr(cfg, f.name)
        spec = f.metadata.get(KNOB)
        if kind not in _KINDS or (optional and value is None):
            continue
        is_kind, expected = _KINDS[kind]
        if spec is not None and spec.choices is not None:
            expected = f"one of {list(spec.choices)}"
        elif spec is not None and spec.within is not None:
            expected = f"{expected} in {spec.within}"
        if optional:
            expected += ", or None"
        if spec is not None and spec.why:
            expected += f" ({spec.why})"
        _check(is_kind(value) and (spec is None or spec.holds(value)), f.name, value, expected)


def _as_tuple(field_name, value, expected) -> tuple:
    if isinstance(value, str):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise ConfigError(f"{field_name}: got {value!r}, expected {expected}") from None


def _check_patterns(field_name, patterns):
    """Every entry is a string that compiles as a regex."""
    for pattern in patterns:
        _check(isinstance(pattern, str), field_name, patterns, "a list of regexes (strings)")
        try:
            re.compile(pattern)
        except (re.error, OverflowError, RecursionError) as e:
            raise ConfigError(f"{field_name}: {pattern!r} is not a valid regex ({e})") from None


def _check(ok, field_name, value, expected):
    if not ok:
        raise ConfigError(f"{field_name}: got {value!r}, expected {expected}")


def check(ok, field_name, value, expected):
    """For variant configs' validate(): raise ConfigError naming the field unless ``ok``."""
    _check(ok, field_name, value, expected)


def config(name: str, **fields_) -> AdapterConfig:
    """Build the typed config of variant ``name``: ``ll.config("lora", r=8, target_names=[...])``."""
    cls = _variant_class(name).config
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(fields_) - known)
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown} for variant {name!r}; "
                          f"known fields: {sorted(known - {'variant'})}")
    fields_ = {k: tuple(v) if isinstance(v, list) else v for k, v in fields_.items()}
    if ":" in name:  # "dist:variant": the config keeps the qualified name, so attach, save and
        dist, _, bare = name.rpartition(":")  # load all resolve that distribution's variant
        fields_["variant"] = re.sub(r"[-_.]+", "-", dist.strip()).lower() + ":" + bare
    return cls(**fields_)
