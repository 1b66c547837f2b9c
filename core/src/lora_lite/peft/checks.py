"""Checks of a PEFT adapter folder as untrusted input: adapter_config.json's size and generic
fields' types, rank_pattern / alpha_pattern keys (literal module names or dotted suffixes, never
regexes a file could make slow), and adapter_model.safetensors' header (the bounds and structure
checks of ``lora_lite.file_checks``), dtypes and values. Every failure is one ``AdapterFileError``
line naming the file and the field or tensor; nothing here touches a model.
"""
from __future__ import annotations

import json
import math
import os
import re

import torch

from .. import file_checks
from ..config import is_finite_number
from ..errors import AdapterFileError
from ..file_checks import FLOAT_DTYPES, check_entries, check_metadata, read_json_header, short

MAX_CONFIG_BYTES = 2**20      # a real adapter_config.json is a few kB
PEFT_WRITER = "PEFT's save_pretrained"
PATTERN_FIELDS = ("rank_pattern", "alpha_pattern")
_MODULE_NAME = re.compile(r"(?:[A-Za-z0-9_]|\\?\.)+")  # letters, digits, _, and . (or \.)


def read_config(path) -> dict:
    """adapter_config.json: at most MAX_CONFIG_BYTES, a JSON object."""
    size = os.path.getsize(path)
    if size > MAX_CONFIG_BYTES:
        raise AdapterFileError(f"{path}: {size} bytes, more than the {MAX_CONFIG_BYTES} an adapter "
                               f"config may have; it was not written by {PEFT_WRITER}")
    try:
        with open(path, "rb") as f:
            config = json.loads(f.read())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else short(str(e))
        raise AdapterFileError(f"{path}: not valid JSON ({reason})") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path}: a JSON {type(config).__name__}, not a JSON object; "
                               "not a PEFT adapter config")
    return config


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field_error(where, name, value, expected):
    return AdapterFileError(f"{where}: field {name!r} is {short(repr(value))}, expected {expected}")


def check_field_types(config, where):
    """The generic fields every PEFT method shares, when present, have the type PEFT writes."""
    checks = {
        "peft_type": (lambda v: isinstance(v, str), "a string such as 'LORA'"),
        "r": (lambda v: _is_int(v) and v >= 0, "a non-negative integer (the rank)"),
        "lora_alpha": (is_finite_number, "a finite number"),
        "target_modules": (lambda v: isinstance(v, str) or (
            isinstance(v, list) and len(v) <= file_checks.MAX_TARGETS
            and all(isinstance(m, str) for m in v)), "a string or a list of module names"),
        # switches that select what the tensors mean: "false" (a string) is not False
        **{flag: (lambda v: isinstance(v, bool), "true or false")
           for flag in ("use_rslora", "use_dora", "inference_mode")},
    }
    for name, (ok, expected) in checks.items():
        if config.get(name) is not None and not ok(config[name]):
            raise _field_error(where, name, config[name], expected)


def resolved_patterns(config, where) -> dict:
    """``config`` with rank_pattern / alpha_pattern checked: {module name or dotted suffix:
    value}; an escaped dot (``\\.``) is read as a dot. Anything else is refused."""
    out = dict(config)
    for field in PATTERN_FIELDS:
        patterns = config.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, dict) or len(patterns) > file_checks.MAX_TARGETS:
            raise _field_error(where, field, patterns, "a JSON object {module name: value}")
        out[field] = {_literal_key(where, field, key): _pattern_value(where, field, key, value)
                      for key, value in patterns.items()}
    return out


def _literal_key(where, field, key) -> str:
    if not (0 < len(key) <= 400 and _MODULE_NAME.fullmatch(key)):
        raise AdapterFileError(
            f"{where}: {field} key {short(key, 40)!r} is not a module name or dotted suffix "
            "(letters, digits, _ and . only): lora-lite does not run regexes from a file; "
            "list the modules by name")
    return key.replace("\\.", ".")


def _pattern_value(where, field, key, value):
    if field == "rank_pattern":
        if value == 0 and _is_int(value):
            raise AdapterFileError(f"{where}: r=0 (rank 0) in rank_pattern: an adapter of rank 0 "
                                   "is no adapter")
        if not (_is_int(value) and value > 0):
            raise AdapterFileError(f"{where}: rank_pattern[{short(key, 40)!r}] is {short(repr(value))}, "
                                   "expected a positive integer")
    elif not is_finite_number(value):
        raise AdapterFileError(f"{where}: alpha_pattern[{short(key, 40)!r}] is {short(repr(value))}, "
                               "expected a finite number")
    return value


def weights_entries(path) -> dict:
    """{tensor key: (dtype, shape)} of adapter_model.safetensors, its header checked (bounds,
    structure, floating dtypes) before any tensor is read."""
    header, data_start, size = read_json_header(path, writer=PEFT_WRITER, kind="safetensors file")
    check_metadata(path, header.pop("__metadata__", None))
    shapes, end = check_entries(path, header, writer=PEFT_WRITER)
    if data_start + end > size:
        raise AdapterFileError(f"{path}: truncated: {size} bytes, the header promises "
                               f"{data_start + end}; the file is incomplete")
    for key, (dtype, _) in shapes.items():
        if dtype not in FLOAT_DTYPES:
            raise AdapterFileError(f"{path}: tensor {short(key)!r} is {dtype}; adapter tensors are "
                                   f"floating point ({', '.join(FLOAT_DTYPES)}): the file is corrupt")
    return shapes


def check_finite(path, tensors: dict):
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise AdapterFileError(f"{path}: tensor {short(key)!r} holds NaN or Inf values; the "
                                   "adapter diverged or the file is corrupt")


def check_contained(path, root):
    """``path`` (a file of the adapter folder) is a regular file that, symlinks resolved, lies
    inside ``root`` (the folder; for a hub download, the repo's cache, whose snapshot files are
    links to its blobs): a link out of it is refused, never followed to another file."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, top]) != top:
        raise AdapterFileError(f"{path}: a link to {short(real, 120)}, outside the adapter folder "
                               f"{short(top, 120)}; copy the file into the folder instead")
    if not os.path.isfile(real):
        raise AdapterFileError(f"{path}: not a regular file")


LAYER_FACTOR = 4  # an adapter of a layer holds at most this many times the layer's numbers


def check_adapter_sizes(where, variant, cfg, targets):
    """Before anything is allocated: each target's adapter tensors (the variant's param_specs
    for that target's config) hold at most LAYER_FACTOR times the numbers of the layer itself,
    so a config's huge r (or rank_pattern value) is refused instead of exhausting memory."""
    for t in targets:
        own = cfg.for_target(t.name)
        try:
            specs = variant.param_specs(t.d_in, t.d_out, own)
            numbers = sum(math.prod(int(d) for d in spec.shape) for spec in specs.values())
        except (ValueError, TypeError, OverflowError, ArithmeticError) as e:
            raise AdapterFileError(f"{where}: r={short(repr(own.r))} does not fit {t.name} "
                                   f"({type(e).__name__}: {short(str(e))})") from None
        limit = LAYER_FACTOR * (t.d_in * t.d_out + t.d_in + t.d_out)
        if numbers > limit:
            raise AdapterFileError(
                f"{where}: r={short(repr(own.r))} would give {t.name} (a {t.d_in}x{t.d_out} layer) "
                f"adapter tensors of {numbers} numbers, more than {LAYER_FACTOR}x the layer "
                "itself: the config's rank does not describe a real adapter")
