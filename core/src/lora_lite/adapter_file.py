"""The adapter file: one safetensors file, no pickle.

Tensors are named ``<module path>.<tensor name>``; only persistent adapter tensors are stored,
never base weights (variants that rewrite a weight rebuild it at load from stored factors).
Metadata (all strings): format, format_version, variant, plugin, plugin_version,
lora_lite_version, config (JSON), targets (JSON list of [name, role, d_in, d_out]), base_model,
and, when the config has per-target ``overrides``, target_overrides (JSON {target name:
{field: value}}: the overrides as resolved on this model).

A file is untrusted input. ``read_header`` checks its structure and bounds what it may hold
(``MAX_*`` in ``lora_lite.file_checks``); ``load`` attaches to the stored, resolved target list
(and per-target overrides) and never re-runs the stored ``target_names`` / ``exclude_names`` /
``overrides`` regexes over the model's module names, so no file can make loading slow. Tensors must be floating point
and finite. Every refusal is an ``AdapterFileError`` raised before the model is touched.
"""
from __future__ import annotations

import json
import os
import stat
import tempfile
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import param_targets as _params  # parameter targets (fused MoE experts)
from . import trainable_modules as _heads  # modules trained in full (PEFT's modules_to_save)
from .attach import DEFAULT, attach_for_loading, check_can_attach, detach, one_adapter
from .config import AdapterConfig, with_resolved_targets
from .errors import AdapterFileError, AdapterSaveError, LoraLiteError
from .file_checks import (
    FLOAT_DTYPES,
    MAX_TARGETS,
    check_entries,
    check_metadata,
    check_targets,
    is_peft_source,
    read_json_header,
    short,
    stored_json,
    target_configs,
)
from .layers.kinds import features, is_adaptable
from .plugins import get_variant, installed_version, origin_mismatch, variant_origin
from .slots import as_adapter, slots
from .targets import Target

FORMAT = "lora-lite"
FORMAT_VERSION = "1"


def save(model, path, name=None) -> None:
    """Write the attached adapter (``name``, or the only one) to ``path`` atomically (temp file in
    the same folder + rename). A named adapter's file is the same as a default one's: the name is
    the model's, not the file's (``ll.load(..., name=)`` picks one).

    Re-saving over a file keeps its permissions (a new file gets 0666 minus the umask) and a
    symlink keeps pointing at the rewritten file. On failure the previous file is intact and the
    error (an ``AdapterSaveError``, an OSError) names ``path``.
    """
    state = one_adapter(model, name, "save")
    tensors = {}
    for t in state.targets:
        persistent = t.layer.state_dict(keep_vars=True)
        for tensor, attr in slots(t.layer)[state.name].attrs.items():
            if attr in persistent and attr in state.tensor_names[t.name]:
                tensors[f"{t.name}.{tensor}"] = persistent[attr].detach().to("cpu").contiguous().clone()
    tensors.update(_param_file_tensors(state))
    tensors.update({k: v.detach().to("cpu").contiguous().clone()
                    for k, v in _heads.trainable_tensors(state).items()})
    origin = variant_origin(state.cfg.variant)
    config_ = getattr(model, "config", None)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "variant": state.cfg.variant,
        "plugin": origin.distribution,
        "plugin_version": origin.version,
        "lora_lite_version": installed_version("lora-lite"),
        "config": state.cfg.to_json(),
        "targets": json.dumps([[t.name, t.role, t.d_in, t.d_out] for t in state.targets]),
        "base_model": str(getattr(config_, "_name_or_path", "") or ""),
    }
    if state.trainable_modules:
        metadata["trainable_modules"] = json.dumps(_heads.describe(state))
    if state.param_targets:
        metadata["param_targets"] = json.dumps([_params.describe(pt) for pt in state.param_targets])
    if state.cfg.overrides:
        metadata["target_overrides"] = json.dumps(_resolved_overrides(state), sort_keys=True)
    _write_atomically(os.fspath(path), tensors, metadata)


def _param_file_tensors(state) -> dict:
    """The persistent parameter-target tensors, '<module path>.<spec>__<parameter>'."""
    out = {}
    for pt in state.param_targets:
        persistent = pt.module.state_dict(keep_vars=True)
        for name in state.tensor_names[pt.name]:
            if name in persistent:
                out[f"{pt.module_name}.{name}"] = persistent[name].detach().to("cpu").contiguous().clone()
    return out


def _resolved_overrides(state) -> dict:
    """{target name: {field: value}} where a target's config differs from the adapter's: its
    ``overrides`` as resolved at attach, read from the layers (no regex is run)."""
    common, out = state.cfg.to_dict(), {}
    for t in state.targets:
        own = slots(t.layer)[state.name].cfg.to_dict()
        diff = {k: v for k, v in own.items() if k != "overrides" and common.get(k) != v}
        if diff:
            out[t.name] = diff
    return out


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


def read_header(path) -> tuple[dict, dict]:
    """(metadata, {tensor name: (dtype, shape)}) of a lora-lite file, checking it is complete."""
    path = os.fspath(path)
    header, data_start, size = read_json_header(path)
    metadata = check_metadata(path, header.pop("__metadata__", None))
    if metadata.get("format") != FORMAT:
        raise AdapterFileError(f"{path}: not a lora-lite adapter file (no lora-lite metadata); "
                               "was it written by ll.save?")
    shapes, end = check_entries(path, header)
    if data_start + end > size:
        raise AdapterFileError(f"{path}: truncated: {size} bytes, the header promises "
                               f"{data_start + end}; the file is incomplete, save it again")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(
            f"{path}: adapter format version {short(metadata.get('format_version'))!r}, this "
            f"lora-lite ({installed_version('lora-lite')}) reads version {FORMAT_VERSION}; upgrade lora-lite")
    return metadata, shapes


def load(model, path, *, revision=None, subfolder=None, name=DEFAULT) -> dict | None:
    """Attach the adapter stored at ``path`` to ``model`` under ``name`` (a fresh base, or one
    holding other adapters under other names). Everything is checked
    before the model is touched; on any failure the model is left as it was. ``path`` may also be
    a PEFT adapter folder or a hub adapter id ("org/name", downloaded by huggingface_hub at
    ``revision``), either with the adapter in ``subfolder``: see ``lora_lite.peft.load``
    (which returns its report; None for a lora-lite file)."""
    if is_peft_source(path):
        from .peft.load import load_peft
        return load_peft(model, path, revision, subfolder, name=name)
    path = os.fspath(path)
    if revision is not None or subfolder is not None:
        raise AdapterFileError(f"{path}: revision / subfolder apply to PEFT adapter folders and "
                               "hub ids; a lora-lite adapter is one .safetensors file")
    metadata, shapes = read_header(path)
    variant, cfg, stored_targets = _stored_adapter(path, metadata)
    cfg = with_resolved_targets(cfg, target_configs(path, metadata, cfg, stored_targets))
    check_can_attach(model, cfg, variant, name)
    targets = _resolve_targets(model, path, metadata, stored_targets)
    params = _stored_param_targets(model, path, metadata)
    heads = _stored_heads(model, path, metadata)
    expected = _expected_tensors(path, variant, cfg, stored_targets, shapes,
                                 {**_params.expected_param_tensors(variant, cfg, params), **heads})
    stored = _read_tensors(path, expected)
    state = attach_for_loading(model, cfg, targets=targets, param_targets=params,
                   name=name)
    try:
        with torch.no_grad():
            for t in state.targets:
                for tensor, attr in slots(t.layer)[name].attrs.items():
                    key = f"{t.name}.{tensor}"
                    if key in stored:
                        getattr(t.layer, attr).copy_(stored[key])
                if variant.after_load is not None:
                    with as_adapter(t.layer, name):
                        variant.after_load(t.layer, t.layer._lora_cfg)
            for key, tensor in _params.param_tensors(state).items():
                if key in stored:
                    tensor.copy_(stored[key])
            held = _heads.trainable_tensors(state)
            if sorted(held) != sorted(heads):
                raise AdapterFileError(f"{path}: the file's trainable modules "
                                       f"{short(sorted(heads)[:3])} are not what its config "
                                       f"selects on this model ({short(sorted(held)[:3])})")
            for key, tensor in held.items():
                tensor.copy_(stored[key])
    except BaseException:
        detach(model, name=name)
        raise
    return None


def _stored_adapter(path, metadata) -> tuple[Any, AdapterConfig, list]:
    """(variant class, config, target list) the metadata describes, each checked."""
    variant_name = metadata.get("variant", "")
    if not variant_name:
        raise AdapterFileError(f"{path}: the file names no variant; it was not written by ll.save")
    plugin = metadata.get("plugin") if isinstance(metadata.get("plugin"), str) else None
    version = metadata.get("plugin_version")
    version = version if isinstance(version, str) else None
    try:
        variant = get_variant(variant_name, distribution=plugin or None, version=version)
    except KeyError as e:
        raise AdapterFileError(f"{path}: {e}") from None
    mismatch = origin_mismatch(variant_name, plugin)
    if mismatch is not None:  # another distribution took the name: do not run it on this file
        raise AdapterFileError(f"{path}: refused: {short(mismatch, 400)}")
    fields = stored_json(path, metadata, "config", dict)
    if fields.get("variant") != variant_name:
        raise AdapterFileError(
            f"{path}: the metadata says variant {short(variant_name)!r} but the stored config says "
            f"{short(fields.get('variant'))!r}; the file was edited or is corrupt, save it again")
    try:
        cfg = AdapterConfig.from_dict(fields)
    except (LoraLiteError, ValueError, TypeError, KeyError) as e:
        raise AdapterFileError(f"{path}: the stored config is not valid here: {short(str(e), 200)}") from None
    return variant, cfg, check_targets(path, stored_json(path, metadata, "targets", list))


def _resolve_targets(model, path, metadata, stored_targets) -> list[Target]:
    """The model's layers named by the stored list, with the stored shapes (no regex is run)."""
    modules = dict(model.named_modules())
    made_for = short(metadata.get("base_model") or "another model")
    out = []
    for name, role, d_in, d_out in stored_targets:
        layer = modules.get(name)
        if layer is None:
            raise AdapterFileError(f"{path}: target layer {short(name)!r} does not exist in this "
                                   f"model; the adapter was made for {made_for}")
        if not is_adaptable(layer):
            raise AdapterFileError(f"{path}: target {short(name)!r} is a {type(layer).__name__}, "
                                   f"not a linear layer (nor an embedding or conv); the adapter was made "
                                   f"for {made_for}")
        have_in, have_out = features(layer)
        if (have_in, have_out) != (d_in, d_out):
            raise AdapterFileError(
                f"{path}: shape mismatch at {short(name)!r}: the adapter expects {d_in}->{d_out}, "
                f"this model has {have_in}->{have_out}; "
                f"the adapter was made for {made_for}")
        out.append(Target(name, layer, role, d_in, d_out))
    return out


def _stored_param_targets(model, path, metadata) -> list:
    """The parameter targets the file lists (none for a file without ``param_targets``)."""
    if "param_targets" not in metadata:
        return []
    stored = stored_json(path, metadata, "param_targets", list)
    if len(stored) > MAX_TARGETS:
        raise AdapterFileError(f"{path}: lists {len(stored)} parameter targets, more than "
                               f"{MAX_TARGETS}; it was not written by ll.save")
    return _params.resolve_stored(model, stored, path)


def _stored_heads(model, path, metadata) -> dict:
    """{'<module>.<parameter>': shape} of the trainable modules the file lists."""
    if "trainable_modules" not in metadata:
        return {}
    stored = stored_json(path, metadata, "trainable_modules", list)
    modules, out = dict(model.named_modules()), {}
    for entry in stored[:MAX_TARGETS + 1]:
        ok = (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
              and isinstance(entry[1], list) and all(isinstance(p, str) for p in entry[1]))
        module = modules.get(entry[0]) if ok else None
        if module is None:
            raise AdapterFileError(f"{path}: trainable module {short(str(entry))} is not a module "
                                   "of this model; the adapter was made for another model")
        params = dict(module.named_parameters())
        for pname in entry[1]:
            if pname not in params:
                raise AdapterFileError(f"{path}: trainable module {short(entry[0])!r} has no "
                                       f"parameter {short(pname)!r} here")
            out[f"{entry[0]}.{pname}"] = tuple(params[pname].shape)
    return out


def _expected_tensors(path, variant, cfg, stored_targets, shapes, expected_params=None) -> dict:
    """{key: shape} the variant stores on these targets, checked against the file's tensors."""
    expected = dict(expected_params or {})
    for name, _, d_in, d_out in stored_targets:
        for tname, spec in variant.param_specs(d_in, d_out, cfg.for_target(name)).items():
            if spec.trainable or spec.persistent:
                expected[f"{name}.{tname}"] = tuple(spec.shape)
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:
        raise AdapterFileError(f"{path}: tensors do not match the {cfg.variant!r} variant: "
                               f"missing {short(missing[:3], 200)}, unexpected {short(extra[:3], 200)}")
    for key, shape in expected.items():
        dtype, stored_shape = shapes[key]
        if stored_shape != shape:
            raise AdapterFileError(f"{path}: tensor {short(key)!r} has shape {stored_shape}, the variant "
                                   f"expects {shape}")
        if dtype not in FLOAT_DTYPES:
            raise AdapterFileError(f"{path}: tensor {short(key)!r} is stored as {short(dtype)}; adapter "
                                   f"tensors are floating point ({', '.join(FLOAT_DTYPES)}), "
                                   "the file was not written by ll.save")
    return expected


def _read_tensors(path, expected) -> dict:
    """The expected tensors, read on the CPU; each must be finite."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            stored = {k: f.get_tensor(k) for k in expected}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{path}: cannot read the tensors ({short(str(e), 160)}); the file "
                               "is corrupt, save it again") from None
    for key, tensor in stored.items():
        if not torch.isfinite(tensor).all():
            raise AdapterFileError(f"{path}: tensor {short(key)!r} holds NaN or Inf values; the adapter "
                                   "diverged or the file is corrupt: retrain, or save a good one again")
    return stored
