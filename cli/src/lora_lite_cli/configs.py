"""An adapter config from the command line: ``--targets``, ``--rank``, ``--layers``, ``--set
knob=value`` (text coerced to each config field's type) -> ``build_config``."""
from __future__ import annotations

import dataclasses
import json

from .errors import CLIError


def parse_sets(pairs) -> dict[str, str]:
    """['block=8', 'road_variant=road_2'] -> {'block': '8', ...} (values still text)."""
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise CLIError(f"--set {pair!r}: expected knob=value, e.g. --set alpha=32", 2)
        out[key] = value.strip()
    return out


def _coerce(field, text: str):
    """Turn the text of --set into the type of config field ``field`` (from its default)."""
    default = field.default if field.default is not dataclasses.MISSING else None
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = field.default_factory()  # type: ignore[misc]
    if not isinstance(text, str):  # a typed value (a variant's train_defaults knobs), not --set text
        return text
    low = text.lower()
    if isinstance(default, bool):
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    if text.startswith("[") and (isinstance(default, (tuple, list)) or "tuple" in str(field.type)):
        return tuple(json.loads(text))  # a JSON list, also for fields defaulting to None
    if isinstance(default, (tuple, list)):
        items = [s.strip() for s in text.split(",") if s.strip()]
        return tuple(_scalar(s) for s in items) if field.name == "layers" else tuple(items)
    if default is None:
        if low in ("none", "null", ""):
            return None
        if field.name == "layers":
            return tuple(int(s) for s in text.split(",") if s.strip())
        return _scalar(text)
    return text  # strings, dtype names


def _scalar(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    return text


def parse_layers(text: str | None):
    """'0,1,5' or '0-3' or 'all' -> tuple of indices or None."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = part.split("-")
                out.extend(range(int(lo), int(hi) + 1))
            elif part:
                out.append(int(part))
        except ValueError:
            raise CLIError(f"--layers {text!r}: expected indices like 0,1,5 or a range 0-3, or all",
                           2) from None
    return tuple(out)


def build_config(variant: str, *, targets=None, rank=None, alpha=None, layers=None,
                 dtype="float32", sets=None, seed=None):
    """The typed config of ``variant`` from command-line values.

    targets: regexes on module names; when omitted, the variant config's own default target
    names, else ``lora_lite.targets.DEFAULT_TARGET_NAMES`` (q/v, like the upstream benchmark); any role. ``sets``:
    {'knob': 'text'} from --set, coerced to each field's type; unknown knobs and bad values
    raise ConfigError naming the field. Raises VariantNotInstalled for an unknown variant.
    """
    import lora_lite as ll
    from lora_lite.targets import DEFAULT_TARGET_NAMES
    cls = ll.get_variant(variant).config
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict = {}
    if targets:
        values["target_names"] = tuple(targets)
    else:
        own = fields["target_names"].default if "target_names" in fields else ()
        # a variant with per-architecture defaults (ia3) resolves them itself at attach
        per_arch = ll.get_variant(variant).default_target_names is not None
        values["target_names"] = tuple(own) if own or per_arch else DEFAULT_TARGET_NAMES
    values["target_roles"] = ()
    if rank is not None:
        values["r"] = rank
    if alpha is not None:
        values["alpha"] = alpha
    if layers is not None:
        values["layers"] = layers
    if seed is not None:
        values["seed"] = seed
    values["dtype"] = dtype
    for key, text in (sets or {}).items():
        if key == "variant":
            raise ll.ConfigError("variant: choose the variant with --variant, not --set")
        if key not in fields:
            known = sorted(k for k in fields if k != "variant")
            raise ll.ConfigError(f"unknown knob {key!r} for variant {variant!r}; "
                                 f"known knobs: {', '.join(known)}")
        try:
            values[key] = _coerce(fields[key], text)
        except (ValueError, TypeError) as e:
            raise ll.ConfigError(f"{key}: cannot read {text!r} ({e})") from None
    return ll.config(variant, **values)
