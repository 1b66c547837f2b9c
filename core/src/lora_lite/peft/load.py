"""PEFT import: ``ll.load(model, folder)`` for a PEFT adapter folder (or a hub adapter id).

The folder holds adapter_config.json and adapter_model.safetensors. Core knows no PEFT method:
each installed variant's ``from_peft(peft_config)`` says whether the config is its own (returning
lora-lite config fields) and ``load_peft_state(layer, cfg, tensors)`` copies that layer's tensors
(PEFT naming, relative to the module; model-level ``base_model.*`` tensors are passed to every
layer too). Refused before the model is touched, with the field named: a missing config, a
pickle (.bin) weights file, ``modules_to_save``, ``bias`` other than "none", a rank of 0,
targets that are not linear layers (Embedding, Conv2d), a peft_type no variant maps.
Targets are the modules the weights file names, matched exactly. The folder is untrusted input
(``lora_lite.peft.checks``): bounded sizes, typed fields, floating finite tensors, and
rank_pattern / alpha_pattern keys that are literal module names (full name or dotted suffix, as
PEFT matches them), resolved once per target so that no regex from the file is ever run.
"""
from __future__ import annotations

import os
import re

import torch
from safetensors import safe_open

from .. import file_checks
from ..attach import DEFAULT, attach_for_loading, check_can_attach, detach
from ..config import config as make_config
from ..config import with_resolved_targets
from ..errors import AdapterFileError, AttachError, LoraLiteError
from ..file_checks import is_peft_source, short  # noqa: F401  (is_peft_source: importable here too)
from ..layers.kinds import check_layer_kinds, is_adaptable
from ..plugins import get_variant, variants
from ..slots import as_adapter
from ..targets import find_targets
from .checks import (
    check_adapter_sizes,
    check_contained,
    check_field_types,
    check_finite,
    read_config,
    resolved_patterns,
    weights_entries,
)
from .export import CONFIG_FILE, MODULE_PREFIX, WEIGHTS_FILE

PICKLE_FILE = "adapter_model.bin"
def resolve_folder(path, revision=None, subfolder=None) -> str:
    """The local folder holding the adapter: ``path`` (or its ``subfolder``) if it is a folder,
    else hub repo ``path`` at ``revision`` downloaded by huggingface_hub (``download_adapter``)."""
    path = os.fspath(path)
    subfolder = _checked_subfolder(path, subfolder)
    if os.path.isdir(path):
        return os.path.join(path, subfolder) if subfolder else path
    return download_adapter(path, revision, subfolder)


def download_adapter(repo_id, revision=None, subfolder=None) -> str:
    """Hub repo ``repo_id``'s adapter_config.json and adapter_model.safetensors (of ``subfolder``)
    into the hub cache, nothing else (never a pickle, never model weights); their folder."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise AdapterFileError(f"{repo_id}: no such folder; to load it as a hub adapter id, "
                               "install huggingface_hub (pip install huggingface_hub)") from None
    prefix = f"{subfolder}/" if subfolder else ""
    try:
        root = snapshot_download(repo_id, revision=revision,
                                 allow_patterns=[prefix + CONFIG_FILE, prefix + WEIGHTS_FILE])
    except Exception as e:  # no network, no such repo or revision, offline mode
        reason = short(str(e).splitlines()[0] if str(e).strip() else "", 160)
        raise AdapterFileError(
            f"{repo_id}: no such folder, and not a reachable hub adapter id "
            f"({type(e).__name__}: {reason}); check the path or the id"
            f"{' and revision' if revision else ''}, connect to the hub (HF_HUB_OFFLINE unset), "
            "or pass the path of a downloaded PEFT adapter folder") from None
    folder = os.path.join(root, subfolder) if subfolder else root
    if os.path.isfile(os.path.join(folder, CONFIG_FILE)) and \
            not os.path.isfile(os.path.join(folder, WEIGHTS_FILE)):
        raise AdapterFileError(f"{repo_id}: the hub repo has no {prefix}{WEIGHTS_FILE} (lora-lite "
                               f"never downloads a pickle {PICKLE_FILE}); use a revision with "
                               "safetensors weights, or re-save the adapter with PEFT")
    return folder


def _checked_subfolder(path, subfolder):
    """``subfolder`` as a relative path inside the adapter's folder or repo (None if not given)."""
    if subfolder is None or subfolder == "":
        return None
    parts = subfolder.replace("\\", "/").rstrip("/").split("/") if isinstance(subfolder, str) else []
    if not parts or any(p in ("", ".", "..") for p in parts):  # not a str, absolute, "a//b", ".."
        raise AdapterFileError(f"{path}: subfolder={short(repr(subfolder))}: expected a relative "
                               "path inside the adapter's folder or hub repo (no '..')")
    return "/".join(parts)


def read_peft_folder(folder, root=None) -> tuple[dict, str]:
    """(adapter_config.json content, weights path), refusing what lora-lite will not read.
    ``root``: the folder its files must resolve into (default ``folder``; see check_contained)."""
    config_path = os.path.join(folder, CONFIG_FILE)
    weights = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(config_path):
        raise AdapterFileError(f"{folder}: no {CONFIG_FILE}: not a PEFT adapter folder (a lora-lite "
                               "adapter is one .safetensors file)")
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(folder, PICKLE_FILE)):
            raise AdapterFileError(
                f"{folder}: the weights are a pickle file ({PICKLE_FILE}), which lora-lite never "
                "loads (it can run code); re-save it with PEFT as safetensors: "
                "PeftModel.from_pretrained(base, folder).save_pretrained(out)")
        raise AdapterFileError(f"{folder}: no {WEIGHTS_FILE} next to {CONFIG_FILE}")
    for path in (config_path, weights):
        check_contained(path, root or folder)
    config = read_config(config_path)
    check_field_types(config, config_path)
    config = resolved_patterns(config, config_path)
    check_generic_fields(config, config_path)
    return config, weights


def check_generic_fields(config, where):
    saved = config.get("modules_to_save")  # (trained heads: loaded by lora_lite.peft.params)
    if saved is not None and not (isinstance(saved, list) and all(isinstance(n, str) and n for n in saved)):
        raise AdapterFileError(f"{where}: modules_to_save={short(repr(saved))} is not a list of "
                               "module names")
    if config.get("bias") not in (None, "none"):
        raise AdapterFileError(f"{where}: bias={short(repr(config['bias']))}: the adapter trains "
                               "bias terms, "
                               "which lora-lite does not attach (only bias='none' is supported)")
    if not config.get("peft_type"):
        raise AdapterFileError(f"{where}: no peft_type: not a PEFT adapter config")


def variant_for(config, where) -> tuple[str, dict]:
    """(variant name, lora-lite config fields) from the first installed variant that maps it."""
    for name in variants():
        from_peft = get_variant(name).from_peft
        if not callable(from_peft):
            continue
        try:
            fields = from_peft(dict(config))
        except (LoraLiteError, ValueError, TypeError, KeyError) as e:
            raise AdapterFileError(f"{where}: {short(str(e), 300)}") from None
        if fields is not None:
            return name, fields
    if config.get("r") == 0:  # (r=0 is a mapped method's business: PEFT's OFT sizes by block)
        raise AdapterFileError(f"{where}: r=0 (rank 0): an adapter of rank 0 is no adapter")
    raise AdapterFileError(f"{where}: peft_type={short(repr(config.get('peft_type')))} "
                           "(with these settings) is "
                           "not mapped by any installed lora-lite variant")


def tensors_by_module(model, weights) -> dict[str, dict]:
    """{module name: {tensor key relative to the module: tensor}}; model-level tensors (keys
    starting with base_model. but not base_model.model.) go to every module."""
    modules = dict(model.named_modules())
    keys: dict[str, dict[str, str]] = {}  # {module name: {tensor key relative to the module: key in the file}}
    shared = {}
    for key in weights_entries(weights):
        if not key.startswith(MODULE_PREFIX):
            shared[key] = key
            continue
        parts = key[len(MODULE_PREFIX):].split(".")
        cut = next((i for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in modules), None)
        if cut is None:
            raise AdapterFileError(f"{weights}: tensor {short(key)!r} names a module this model "
                                   "lacks; the adapter was made for another model")
        keys.setdefault(".".join(parts[:cut]), {})[".".join(parts[cut:])] = key
    if len(keys) > file_checks.MAX_TARGETS:
        raise AdapterFileError(f"{weights}: adapts {len(keys)} modules, more than "
                               f"{file_checks.MAX_TARGETS}; no real adapter is that large")
    for name in keys:
        if not is_adaptable(modules[name]):  # MultiheadAttention, grouped Conv2d, ...
            raise AdapterFileError(f"{weights}: target_modules includes {name!r}, a "
                                   f"{type(modules[name]).__name__}: lora-lite cannot adapt this kind")
    stored = read_tensors(weights)
    return {name: {**{rel: stored[key] for rel, key in rel_keys.items()},
                   **{rel: stored[key] for rel, key in shared.items()}}
            for name, rel_keys in keys.items()}


def read_tensors(weights) -> dict:
    """Every tensor of the (header-checked) weights file, on the CPU, each finite."""
    try:
        with safe_open(weights, framework="pt", device="cpu") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise AdapterFileError(f"{weights}: unreadable safetensors file "
                               f"({short(str(e), 160)})") from None
    check_finite(weights, stored)
    return stored


def load_peft(model, path, revision=None, subfolder=None, name=DEFAULT) -> dict:
    """Attach the PEFT adapter at ``path`` (folder or hub id; a hub ``revision``, a
    ``subfolder`` of either) to ``model``; returns {"variant", "peft_type", "targets"}. On any
    failure the model is left as it was. ``name``: the adapter's name on the model."""
    adapter = name
    folder = resolve_folder(path, revision, subfolder)
    local = os.path.isdir(os.fspath(path))  # else a hub snapshot: links into the repo's blobs
    root = folder if local else hub_repo_root(folder, _checked_subfolder(path, subfolder))
    config, weights = read_peft_folder(folder, root)
    from ..layers.mha import names_attention
    if (config.get("target_parameters") or config.get("modules_to_save")  # lora_lite.peft.params
            or names_attention(model, weights)):  # nn.MultiheadAttention: lora_lite.layers.mha
        from .params import load_peft_params
        if adapter != DEFAULT:
            raise AttachError(f"{folder}: a PEFT folder with target_parameters, modules_to_save or an "
                              "nn.MultiheadAttention loads as the model's one adapter for now; load "
                              "it without name=")
        return load_peft_params(model, folder, config, weights)
    name, fields = variant_for(config, os.path.join(folder, CONFIG_FILE))
    per_module = tensors_by_module(model, weights)
    names = sorted(per_module)
    fields = fields_for_tensors(name, fields, per_module, os.path.join(folder, CONFIG_FILE))
    try:
        cfg = make_config(name, **fields, target_names=tuple(f"^{re.escape(n)}$" for n in names),
                          target_roles=(), exclude_names=())
        resolved = find_targets(model, cfg)
        check_layer_kinds(get_variant(name), resolved)  # e.g. an embedding under a linear-only variant
        found = sorted(t.name for t in resolved)
        cfg = with_resolved_targets(cfg, resolve_overrides(cfg, names))
    except LoraLiteError as e:
        raise AdapterFileError(f"{folder}: {short(str(e), 300)}") from None
    if found != names:
        raise AdapterFileError(f"{folder}: the adapter's modules {names[:3]} do not all resolve to "
                               "linear layers of this model")
    variant = get_variant(name)
    check_can_attach(model, cfg, variant, adapter)
    check_adapter_sizes(os.path.join(folder, CONFIG_FILE), variant, cfg,
                        [t for t in find_targets(model, cfg)])
    state = attach_for_loading(model, cfg, name=adapter)
    try:
        with torch.no_grad():
            for t in state.targets:
                with as_adapter(t.layer, adapter):
                    variant.load_peft_state(t.layer, t.layer._lora_cfg, per_module[t.name])
    except BaseException as e:
        detach(model, name=adapter)
        if isinstance(e, (LoraLiteError, RuntimeError, ValueError, KeyError, TypeError, IndexError)):
            reason = short(" ".join(str(e).split()), 300)  # one line
            raise AdapterFileError(f"{folder}: the tensors do not fit variant {name!r}: "
                                   f"{type(e).__name__}: {reason}") from None
        raise
    return {"variant": name, "peft_type": config["peft_type"], "targets": len(names)}


def fields_for_tensors(name, fields, per_module, where) -> dict:
    """The variant's ``peft_fields_for_tensors(fields, tensors_by_module)``, where it has one:
    the config fields as the tensors say (e.g. PEFT's BOFT saving a factor count its CPU build
    did not train, which PEFT's own loader follows); a ValueError is refused in one line."""
    adjust = get_variant(name).peft_fields_for_tensors
    if not callable(adjust):
        return fields
    try:
        return adjust(dict(fields), per_module)
    except ValueError as e:
        raise AdapterFileError(f"{where}: {short(' '.join(str(e).split()), 300)}") from None


def hub_repo_root(folder, subfolder=None) -> str:
    """The hub cache folder of a snapshot (``<repo>/snapshots/<revision>[/<subfolder>]``): its
    files are links to ``<repo>/blobs``, which they may resolve into, and nowhere else."""
    snapshot = os.path.abspath(folder)
    for _ in subfolder.split("/") if subfolder else ():
        snapshot = os.path.dirname(snapshot)
    return os.path.dirname(os.path.dirname(snapshot))


def resolve_overrides(cfg, names) -> dict:
    """{target name: its config}, run once at import. The variant's ``overrides`` come from
    rank_pattern / alpha_pattern keys checked to be literal module names (``peft_checks``), so
    matching them is linear in the name; later ``for_target`` calls answer from this list."""
    return {name: cfg.for_target(name) for name in names}


def peft_tensor(tensors: dict, key: str, shape) -> torch.Tensor:
    """For variants' load_peft_state: tensors[key] reshaped to ``shape``; a missing key or a
    different number of elements raises ValueError naming the key."""
    if key not in tensors:
        raise ValueError(f"missing tensor {key!r} (the layer has {sorted(tensors)[:4]})")
    value = tensors[key]
    if value.numel() != torch.Size(shape).numel():
        raise ValueError(f"tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    return value.reshape(shape)
