"""The adapter file: one safetensors file, no pickle (design.md section 5).

Tensors are named ``<module path>.<tensor name>``; only persistent adapter tensors are stored,
never base weights (variants that rewrite a weight rebuild it at load from stored factors).
Metadata (all strings): format, format_version, variant, plugin, plugin_version,
lora_lite_version, config (JSON), targets (JSON list of [name, role, d_in, d_out]), base_model.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .attach import STATE_ATTR, attach, attached, detach
from .config import AdapterConfig
from .errors import AdapterFileError, AttachError, LoraLiteError
from .plugins import KNOWN_DISTRIBUTIONS, _version, get_variant, variant_origin
from .targets import find_targets

FORMAT = "lora-lite"
FORMAT_VERSION = "1"


def save(model, path) -> None:
    """Write the attached adapter to ``path`` atomically (temp file in the same folder + rename)."""
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
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".lora-lite-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would stick: give ordinary permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_header(path) -> tuple[dict, dict]:
    """(metadata, {tensor name: (dtype, shape)}) of a lora-lite file, checking it is complete."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AdapterFileError(f"{path}: no such adapter file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterFileError(f"{path}: not a lora-lite adapter (empty or not safetensors)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise AdapterFileError(f"{path}: not a safetensors file, or truncated inside its header")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise AdapterFileError(f"{path}: not a safetensors file (unreadable header)") from None
    metadata = header.pop("__metadata__", None) or {}
    if metadata.get("format") != FORMAT:
        raise AdapterFileError(f"{path}: not a lora-lite adapter file (no lora-lite metadata); "
                               "was it written by ll.save?")
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + n + end > size:
        raise AdapterFileError(f"{path}: truncated: {size} bytes, the header promises {8 + n + end}; "
                               "the file is incomplete, save it again")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(
            f"{path}: adapter format version {metadata.get('format_version')!r}, this lora-lite "
            f"({_version('lora-lite')}) reads version {FORMAT_VERSION}; upgrade lora-lite")
    shapes = {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}
    return metadata, shapes


def load(model, path) -> None:
    """Attach the adapter stored at ``path`` to ``model`` (a fresh base). Everything is checked
    before the model is touched; on any failure the model is left as it was. ``path`` may also be
    a PEFT adapter folder (or hub id): see ``lora_lite.peft_import``."""
    from .peft_import import is_peft_source, load_peft
    if is_peft_source(path):
        return load_peft(model, path)
    metadata, shapes = read_header(path)
    variant_name = metadata.get("variant", "")
    try:
        variant = get_variant(variant_name)
    except KeyError:
        dist = metadata.get("plugin") or KNOWN_DISTRIBUTIONS.get(variant_name, f"lora-lite-{variant_name}")
        raise AdapterFileError(
            f"{path}: this adapter needs variant {variant_name!r}, which is not installed: "
            f"pip install {dist}") from None
    try:
        cfg = AdapterConfig.from_json(metadata["config"])
        stored_targets = json.loads(metadata["targets"])
    except (LoraLiteError, ValueError, TypeError, KeyError) as e:
        raise AdapterFileError(f"{path}: the stored config is not valid here: {e}") from None
    if attached(model) is not None:
        raise AttachError(f"this model already has a {attached(model).cfg.variant!r} adapter "
                          "attached; call ll.detach(model) first")
    modules = dict(model.named_modules())
    for name, role, d_in, d_out in stored_targets:
        layer = modules.get(name)
        if layer is None:
            raise AdapterFileError(f"{path}: target layer {name!r} does not exist in this model; "
                                   f"the adapter was made for {metadata.get('base_model') or 'another model'}")
        if (int(layer.in_features), int(layer.out_features)) != (d_in, d_out):
            raise AdapterFileError(
                f"{path}: shape mismatch at {name!r}: the adapter expects {d_in}->{d_out}, this "
                f"model has {layer.in_features}->{layer.out_features}; "
                f"the adapter was made for {metadata.get('base_model') or 'another model'}")
    try:
        found = [t.name for t in find_targets(model, cfg)]
    except LoraLiteError as e:
        raise AdapterFileError(f"{path}: {e}") from None
    if found != [t[0] for t in stored_targets]:
        raise AdapterFileError(f"{path}: the adapter's target selection picks different layers on "
                               "this model than on the one it was saved from")
    expected = {}
    for name, _, d_in, d_out in stored_targets:
        for tname, spec in variant.param_specs(d_in, d_out, cfg.for_target(name)).items():
            if spec.trainable or spec.persistent:
                expected[f"{name}.{tname}"] = tuple(spec.shape)
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:
        raise AdapterFileError(f"{path}: tensors do not match the {variant_name!r} variant: "
                               f"missing {missing[:3]}, unexpected {extra[:3]}")
    for key, shape in expected.items():
        if shapes[key][1] != shape:
            raise AdapterFileError(f"{path}: tensor {key!r} has shape {shapes[key][1]}, the variant "
                                   f"expects {shape}")
    with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        stored = {k: f.get_tensor(k) for k in expected}
    attach(model, cfg, _skip_group_init=True)
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
