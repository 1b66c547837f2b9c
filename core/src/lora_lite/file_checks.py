"""Checks of an adapter file as untrusted input: the safetensors header's structure, the bounds
on what a file may hold, and the stored metadata's JSON (config, targets, target_overrides).
Every failure is one ``AdapterFileError`` line naming the file; nothing here touches a model.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct

from .config import _NOT_OVERRIDABLE, ROLES
from .errors import AdapterFileError, LoraLiteError

# What a file may hold: far above any real adapter (a 80-layer model with every projection
# targeted has ~560 targets, ~2,000 tensors and ~100 kB of metadata), far below what would
# make reading the header slow.
MAX_HEADER_BYTES = 32 * 2**20
MAX_TENSORS = 100_000
MAX_TARGETS = 20_000
MAX_METADATA_CHARS = 4 * 2**20
TARGET_ROLES = (*ROLES, "square")  # "square": an unclassified square layer picked by name
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
             "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def short(value, limit=80) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_json_header(path, writer="ll.save", kind="lora-lite adapter") -> tuple[dict, int, int]:
    """(the parsed header object, where the data starts, the file size); ``writer`` and ``kind``
    name what the file should be, in the messages."""
    if not os.path.isfile(path):
        raise AdapterFileError(f"{path}: no such adapter file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterFileError(f"{path}: not a {kind} (empty or not safetensors)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise AdapterFileError(f"{path}: not a safetensors file, or truncated inside its header")
        if n > MAX_HEADER_BYTES:
            raise AdapterFileError(f"{path}: a header of {n} bytes, more than the {MAX_HEADER_BYTES} "
                                   f"an adapter file may have; it was not written by {writer}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise AdapterFileError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path}: the safetensors header is a {type(header).__name__}, "
                               "not a JSON object; the file is corrupt or not an adapter")
    return header, 8 + n, size


def check_metadata(path, metadata) -> dict:
    """``__metadata__``: absent, or an object of strings, each of bounded length."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise AdapterFileError(f"{path}: __metadata__ is a {type(metadata).__name__}, not a JSON "
                               "object of strings; the file is corrupt")
    for key in sorted(metadata):
        value = metadata[key]
        if not isinstance(value, str):
            raise AdapterFileError(f"{path}: metadata {short(key)!r} is a {type(value).__name__}, "
                                   "not a string; the file is corrupt or was not written by ll.save")
        if len(value) > MAX_METADATA_CHARS:
            raise AdapterFileError(f"{path}: metadata {short(key)!r} has {len(value)} characters, "
                                   f"more than {MAX_METADATA_CHARS}; it was not written by ll.save")
    return metadata


def check_entries(path, header, writer="ll.save") -> tuple[dict, int]:
    """({tensor name: (dtype, shape)}, end of the data) from the header's tensor entries."""
    if len(header) > MAX_TENSORS:
        raise AdapterFileError(f"{path}: holds {len(header)} tensors, more than {MAX_TENSORS}; "
                               f"it was not written by {writer}")
    shapes, end = {}, 0
    for name, info in header.items():
        dtype, shape, stop = check_entry(path, name, info)
        shapes[name] = (dtype, shape)
        end = max(end, stop)
    return shapes, end


def check_entry(path, name, info) -> tuple[str, tuple, int]:
    where = f"{path}: tensor {short(name)!r}"
    if not isinstance(info, dict):
        raise AdapterFileError(f"{where} is a {type(info).__name__}, not an object; the file is corrupt")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise AdapterFileError(f"{where} has no dtype; the file is corrupt")
    if not (isinstance(shape, list) and all(is_count(d) for d in shape)):
        raise AdapterFileError(f"{where} has shape {short(shape)}, not a list of non-negative "
                               "integers; the file is corrupt")
    if offsets is None:
        raise AdapterFileError(f"{where} has no data_offsets; the file is corrupt")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise AdapterFileError(f"{where} has data_offsets {short(offsets)}, expected [begin, end] "
                               "with 0 <= begin <= end; the file is corrupt")
    itemsize = _ITEMSIZE.get(dtype)
    if itemsize is not None and offsets[1] - offsets[0] != math.prod(shape) * itemsize:
        raise AdapterFileError(f"{where}: its data_offsets span {offsets[1] - offsets[0]} bytes, a "
                               f"{dtype} tensor of shape {tuple(shape)} needs "
                               f"{math.prod(shape) * itemsize}; the file is corrupt")
    return dtype, tuple(shape), offsets[1]


def stored_json(path, metadata, key, kind):
    text = metadata.get(key)
    if text is None:
        raise AdapterFileError(f"{path}: the metadata has no {key!r}; it was not written by ll.save")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else short(str(e))
        raise AdapterFileError(f"{path}: the stored {key} is not JSON ({reason}); the file is corrupt") from None
    if not isinstance(value, kind):
        raise AdapterFileError(f"{path}: the stored {key} is a {type(value).__name__}, not a JSON "
                               f"{'object' if kind is dict else 'list'}; the file is corrupt")
    return value


def target_configs(path, metadata, cfg, stored_targets) -> dict:
    """{target name: its config} from the file's resolved ``target_overrides``: the stored
    ``overrides`` regexes are never run over module names."""
    text = metadata.get("target_overrides")
    if text is None and cfg.overrides:
        raise AdapterFileError(f"{path}: the config has per-target overrides but the file does not "
                               "list them resolved (target_overrides); save it again with this lora-lite")
    resolved = {} if text is None else stored_json(path, metadata, "target_overrides", dict)
    if resolved and not cfg.overrides:
        raise AdapterFileError(f"{path}: target_overrides without overrides in the config; "
                               "the file was edited or is corrupt")
    names = [t[0] for t in stored_targets]
    unknown = sorted(set(resolved) - set(names))
    if unknown:
        raise AdapterFileError(f"{path}: target_overrides names {short(unknown[0])!r}, which is not "
                               "a stored target; the file is corrupt")
    allowed = {f.name for f in dataclasses.fields(cfg)} - set(_NOT_OVERRIDABLE)
    out = {}
    for name in names:
        values = resolved.get(name, {})
        if not (isinstance(values, dict) and set(values) <= allowed):
            raise AdapterFileError(f"{path}: target_overrides of {short(name)!r} is {short(values)}, "
                                   f"expected {{field: value}} with fields among {sorted(allowed)}")
        try:
            out[name] = dataclasses.replace(cfg, overrides=(), **values) if values else cfg
        except (LoraLiteError, ValueError, TypeError) as e:
            raise AdapterFileError(f"{path}: the override of {short(name)!r} is not valid: "
                                   f"{short(str(e), 200)}") from None
    return out


def check_targets(path, targets) -> list:
    """The stored target list: at most MAX_TARGETS distinct [name, role, d_in, d_out]."""
    if len(targets) > MAX_TARGETS:
        raise AdapterFileError(f"{path}: lists {len(targets)} targets, more than {MAX_TARGETS}; "
                               "it was not written by ll.save")
    seen = set()
    for i, t in enumerate(targets):
        if not (isinstance(t, list) and len(t) == 4 and isinstance(t[0], str)
                and isinstance(t[1], str) and t[1] in TARGET_ROLES
                and is_count(t[2]) and is_count(t[3])):
            raise AdapterFileError(f"{path}: target {i} is {short(t)}, expected [module name, "
                                   f"role (one of {TARGET_ROLES}), d_in, d_out]; the file is corrupt")
        if t[0] in seen:
            raise AdapterFileError(f"{path}: target {short(t[0])!r} is listed twice; the file is corrupt")
        seen.add(t[0])
    return targets


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_peft_source(path) -> bool:
    """A PEFT source for ``ll.load`` (read by lora_lite.peft.load): a folder, or something that
    looks like a hub id (org/name) and is no local path."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return True
    return (not os.path.exists(path) and bool(_HUB_ID.match(path))
            and not path.endswith((".safetensors", ".bin", ".pt", ".json")))
