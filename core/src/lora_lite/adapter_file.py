"""The adapter file: one safetensors file, no pickle.

Tensors are named ``<module path>.<tensor name>``; only persistent adapter tensors are stored,
never base weights (variants that rewrite a weight rebuild it at load from stored factors).
Metadata (all strings): format, format_version, variant, plugin, plugin_version,
lora_lite_version, config (JSON), targets (JSON list of [name, role, d_in, d_out]), base_model.

A file is untrusted input. ``read_header`` checks its structure and bounds what it may hold
(``MAX_*`` below); ``load`` attaches to the stored, resolved target list and never re-runs the
stored ``target_names`` / ``exclude_names`` regexes over the model's module names, so no file
can make loading slow. Tensors must be floating point and finite. Every refusal is an
``AdapterFileError`` raised before the model is touched.
"""
from __future__ import annotations

import json
import math
import os
import stat
import struct
import tempfile

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .attach import STATE_ATTR, attach, attached, detach
from .config import ROLES, AdapterConfig
from .errors import AdapterFileError, AdapterSaveError, AttachError, LoraLiteError
from .plugins import _version, get_variant, origin_mismatch, variant_origin
from .layer_kinds import features, is_linear_like
from .targets import Target

FORMAT = "lora-lite"
FORMAT_VERSION = "1"

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


def save(model, path) -> None:
    """Write the attached adapter to ``path`` atomically (temp file in the same folder + rename).

    Re-saving over a file keeps its permissions (a new file gets 0666 minus the umask) and a
    symlink keeps pointing at the rewritten file. On failure the previous file is intact and the
    error (an ``AdapterSaveError``, an OSError) names ``path``.
    """
    state = attached(model)
    if state is None:
        raise AttachError("nothing to save: no lora-lite adapter is attached to this model")
    tensors = {}
    for t in state.targets:
        persistent = t.layer.state_dict(keep_vars=True)
        for name in state.tensor_names[t.name]:
            if name in persistent:
                tensors[f"{t.name}.{name}"] = persistent[name].detach().to("cpu").contiguous().clone()
    origin = variant_origin(state.cfg.variant)
    config_ = getattr(model, "config", None)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "variant": state.cfg.variant,
        "plugin": origin.distribution,
        "plugin_version": origin.version,
        "lora_lite_version": _version("lora-lite"),
        "config": state.cfg.to_json(),
        "targets": json.dumps([[t.name, t.role, t.d_in, t.d_out] for t in state.targets]),
        "base_model": str(getattr(config_, "_name_or_path", "") or ""),
    }
    _write_atomically(os.fspath(path), tensors, metadata)


def _write_atomically(path, tensors, metadata):
    destination = os.path.realpath(path)  # through a symlink: the link stays a link
    tmp = None
    try:
        mode = _mode_for(destination)
        fd, tmp = tempfile.mkstemp(prefix=".lora-lite-", suffix=".tmp",
                                   dir=os.path.dirname(destination))
        os.close(fd)
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, mode)  # mkstemp's 0600 would stick
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, destination)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, (OSError, SafetensorError)):
            raise _save_error(path, e) from None
        raise


def _mode_for(destination) -> int:
    """The permissions of the file being replaced, else ordinary ones (0666 minus the umask)."""
    try:
        return stat.S_IMODE(os.stat(destination).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _save_error(path, e) -> AdapterSaveError:
    """The error of a failed save, naming the path asked for (not the temporary file)."""
    reason = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__
    return AdapterSaveError(
        getattr(e, "errno", None),
        f"{path}: cannot save the adapter ({reason}); any previous file there is unchanged. "
        "Check that the folder exists and is writable, with free space")


def _short(value, limit=80) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(path) -> tuple[dict, dict]:
    """(metadata, {tensor name: (dtype, shape)}) of a lora-lite file, checking it is complete."""
    path = os.fspath(path)
    header, data_start, size = _read_json_header(path)
    metadata = _check_metadata(path, header.pop("__metadata__", None))
    if metadata.get("format") != FORMAT:
        raise AdapterFileError(f"{path}: not a lora-lite adapter file (no lora-lite metadata); "
                               "was it written by ll.save?")
    shapes, end = _check_entries(path, header)
    if data_start + end > size:
        raise AdapterFileError(f"{path}: truncated: {size} bytes, the header promises "
                               f"{data_start + end}; the file is incomplete, save it again")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(
            f"{path}: adapter format version {_short(metadata.get('format_version'))!r}, this "
            f"lora-lite ({_version('lora-lite')}) reads version {FORMAT_VERSION}; upgrade lora-lite")
    return metadata, shapes


def _read_json_header(path) -> tuple[dict, int, int]:
    """(the parsed header object, where the data starts, the file size)."""
    if not os.path.isfile(path):
        raise AdapterFileError(f"{path}: no such adapter file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterFileError(f"{path}: not a lora-lite adapter (empty or not safetensors)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise AdapterFileError(f"{path}: not a safetensors file, or truncated inside its header")
        if n > MAX_HEADER_BYTES:
            raise AdapterFileError(f"{path}: a header of {n} bytes, more than the {MAX_HEADER_BYTES} "
                                   "a lora-lite file may have; it was not written by ll.save")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise AdapterFileError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path}: the safetensors header is a {type(header).__name__}, "
                               "not a JSON object; the file is corrupt or not an adapter")
    return header, 8 + n, size


def _check_metadata(path, metadata) -> dict:
    """``__metadata__``: absent, or an object of strings, each of bounded length."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise AdapterFileError(f"{path}: __metadata__ is a {type(metadata).__name__}, not a JSON "
                               "object of strings; the file is corrupt")
    for key in sorted(metadata):
        value = metadata[key]
        if not isinstance(value, str):
            raise AdapterFileError(f"{path}: metadata {_short(key)!r} is a {type(value).__name__}, "
                                   "not a string; the file is corrupt or was not written by ll.save")
        if len(value) > MAX_METADATA_CHARS:
            raise AdapterFileError(f"{path}: metadata {_short(key)!r} has {len(value)} characters, "
                                   f"more than {MAX_METADATA_CHARS}; it was not written by ll.save")
    return metadata


def _check_entries(path, header) -> tuple[dict, int]:
    """({tensor name: (dtype, shape)}, end of the data) from the header's tensor entries."""
    if len(header) > MAX_TENSORS:
        raise AdapterFileError(f"{path}: holds {len(header)} tensors, more than {MAX_TENSORS}; "
                               "it was not written by ll.save")
    shapes, end = {}, 0
    for name, info in header.items():
        dtype, shape, stop = _check_entry(path, name, info)
        shapes[name] = (dtype, shape)
        end = max(end, stop)
    return shapes, end


def _check_entry(path, name, info) -> tuple[str, tuple, int]:
    where = f"{path}: tensor {_short(name)!r}"
    if not isinstance(info, dict):
        raise AdapterFileError(f"{where} is a {type(info).__name__}, not an object; the file is corrupt")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise AdapterFileError(f"{where} has no dtype; the file is corrupt")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise AdapterFileError(f"{where} has shape {_short(shape)}, not a list of non-negative "
                               "integers; the file is corrupt")
    if offsets is None:
        raise AdapterFileError(f"{where} has no data_offsets; the file is corrupt")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise AdapterFileError(f"{where} has data_offsets {_short(offsets)}, expected [begin, end] "
                               "with 0 <= begin <= end; the file is corrupt")
    itemsize = _ITEMSIZE.get(dtype)
    if itemsize is not None and offsets[1] - offsets[0] != math.prod(shape) * itemsize:
        raise AdapterFileError(f"{where}: its data_offsets span {offsets[1] - offsets[0]} bytes, a "
                               f"{dtype} tensor of shape {tuple(shape)} needs "
                               f"{math.prod(shape) * itemsize}; the file is corrupt")
    return dtype, tuple(shape), offsets[1]


def load(model, path) -> None:
    """Attach the adapter stored at ``path`` to ``model`` (a fresh base). Everything is checked
    before the model is touched; on any failure the model is left as it was. ``path`` may also be
    a PEFT adapter folder (or hub id): see ``lora_lite.peft_import``."""
    from .peft_import import is_peft_source, load_peft
    if is_peft_source(path):
        return load_peft(model, path)
    path = os.fspath(path)
    metadata, shapes = read_header(path)
    variant, cfg, stored_targets = _stored_adapter(path, metadata)
    if attached(model) is not None:
        raise AttachError(f"this model already has a {attached(model).cfg.variant!r} adapter "
                          "attached; call ll.detach(model) first")
    targets = _resolve_targets(model, path, metadata, stored_targets)
    expected = _expected_tensors(path, variant, cfg, stored_targets, shapes)
    stored = _read_tensors(path, expected)
    attach(model, cfg, _skip_group_init=True, _targets=targets)
    try:
        with torch.no_grad():
            state = attached(model)
            for t in state.targets:
                for tname in state.tensor_names[t.name]:
                    key = f"{t.name}.{tname}"
                    if key in stored:
                        getattr(t.layer, tname).copy_(stored[key])
                if callable(getattr(variant, "after_load", None)):
                    variant.after_load(t.layer, t.layer._lora_cfg)
    except BaseException:
        detach(model)
        raise


def _stored_adapter(path, metadata) -> tuple[type, AdapterConfig, list]:
    """(variant class, config, target list) the metadata describes, each checked."""
    variant_name = metadata.get("variant", "")
    if not variant_name:
        raise AdapterFileError(f"{path}: the file names no variant; it was not written by ll.save")
    plugin = metadata.get("plugin") if isinstance(metadata.get("plugin"), str) else None
    try:
        variant = get_variant(variant_name, distribution=_short(plugin) if plugin else None)
    except KeyError as e:
        raise AdapterFileError(f"{path}: cannot load this adapter: {e}") from None
    mismatch = origin_mismatch(variant_name, plugin)
    if mismatch is not None:  # another distribution took the name: do not run it on this file
        raise AdapterFileError(f"{path}: refused: {_short(mismatch, 400)}")
    fields = _stored_json(path, metadata, "config", dict)
    if fields.get("variant") != variant_name:
        raise AdapterFileError(
            f"{path}: the metadata says variant {_short(variant_name)!r} but the stored config says "
            f"{_short(fields.get('variant'))!r}; the file was edited or is corrupt, save it again")
    try:
        cfg = AdapterConfig.from_dict(fields)
    except (LoraLiteError, ValueError, TypeError, KeyError) as e:
        raise AdapterFileError(f"{path}: the stored config is not valid here: {_short(str(e), 200)}") from None
    return variant, cfg, _check_targets(path, _stored_json(path, metadata, "targets", list))


def _stored_json(path, metadata, key, kind):
    text = metadata.get(key)
    if text is None:
        raise AdapterFileError(f"{path}: the metadata has no {key!r}; it was not written by ll.save")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else _short(str(e))
        raise AdapterFileError(f"{path}: the stored {key} is not JSON ({reason}); the file is corrupt") from None
    if not isinstance(value, kind):
        raise AdapterFileError(f"{path}: the stored {key} is a {type(value).__name__}, not a JSON "
                               f"{'object' if kind is dict else 'list'}; the file is corrupt")
    return value


def _check_targets(path, targets) -> list:
    """The stored target list: at most MAX_TARGETS distinct [name, role, d_in, d_out]."""
    if len(targets) > MAX_TARGETS:
        raise AdapterFileError(f"{path}: lists {len(targets)} targets, more than {MAX_TARGETS}; "
                               "it was not written by ll.save")
    seen = set()
    for i, t in enumerate(targets):
        if not (isinstance(t, list) and len(t) == 4 and isinstance(t[0], str)
                and isinstance(t[1], str) and t[1] in TARGET_ROLES
                and _is_count(t[2]) and _is_count(t[3])):
            raise AdapterFileError(f"{path}: target {i} is {_short(t)}, expected [module name, "
                                   f"role (one of {TARGET_ROLES}), d_in, d_out]; the file is corrupt")
        if t[0] in seen:
            raise AdapterFileError(f"{path}: target {_short(t[0])!r} is listed twice; the file is corrupt")
        seen.add(t[0])
    return targets


def _resolve_targets(model, path, metadata, stored_targets) -> list[Target]:
    """The model's layers named by the stored list, with the stored shapes (no regex is run)."""
    modules = dict(model.named_modules())
    made_for = _short(metadata.get("base_model") or "another model")
    out = []
    for name, role, d_in, d_out in stored_targets:
        layer = modules.get(name)
        if layer is None:
            raise AdapterFileError(f"{path}: target layer {_short(name)!r} does not exist in this "
                                   f"model; the adapter was made for {made_for}")
        if not is_linear_like(layer):
            raise AdapterFileError(f"{path}: target {_short(name)!r} is a {type(layer).__name__}, "
                                   f"not a linear layer; the adapter was made for {made_for}")
        have_in, have_out = features(layer)
        if (have_in, have_out) != (d_in, d_out):
            raise AdapterFileError(
                f"{path}: shape mismatch at {_short(name)!r}: the adapter expects {d_in}->{d_out}, "
                f"this model has {have_in}->{have_out}; "
                f"the adapter was made for {made_for}")
        out.append(Target(name, layer, role, d_in, d_out))
    return out


def _expected_tensors(path, variant, cfg, stored_targets, shapes) -> dict:
    """{key: shape} the variant stores on these targets, checked against the file's tensors."""
    expected = {}
    for name, _, d_in, d_out in stored_targets:
        for tname, spec in variant.param_specs(d_in, d_out, cfg.for_target(name)).items():
            if spec.trainable or spec.persistent:
                expected[f"{name}.{tname}"] = tuple(spec.shape)
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:
        raise AdapterFileError(f"{path}: tensors do not match the {cfg.variant!r} variant: "
                               f"missing {_short(missing[:3], 200)}, unexpected {_short(extra[:3], 200)}")
    for key, shape in expected.items():
        dtype, stored_shape = shapes[key]
        if stored_shape != shape:
            raise AdapterFileError(f"{path}: tensor {_short(key)!r} has shape {stored_shape}, the variant "
                                   f"expects {shape}")
        if dtype not in FLOAT_DTYPES:
            raise AdapterFileError(f"{path}: tensor {_short(key)!r} is stored as {_short(dtype)}; adapter "
                                   f"tensors are floating point ({', '.join(FLOAT_DTYPES)}), "
                                   "the file was not written by ll.save")
    return expected


def _read_tensors(path, expected) -> dict:
    """The expected tensors, read on the CPU; each must be finite."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            stored = {k: f.get_tensor(k) for k in expected}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{path}: cannot read the tensors ({_short(str(e), 160)}); the file "
                               "is corrupt, save it again") from None
    for key, tensor in stored.items():
        if not torch.isfinite(tensor).all():
            raise AdapterFileError(f"{path}: tensor {_short(key)!r} holds NaN or Inf values; the adapter "
                                   "diverged or the file is corrupt: retrain, or save a good one again")
    return stored
