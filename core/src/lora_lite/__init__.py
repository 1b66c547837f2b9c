"""lora-lite: LoRA-family adapters attached to any PyTorch model with forward hooks.

    import lora_lite as ll
    cfg = ll.config("lora", r=8, target_names=[r"q_proj$", r"v_proj$"])
    ll.attach(model, cfg)             # base frozen, adapter tensors on the target layers
    ll.save(model, "a.safetensors")   # small file: adapter tensors + metadata
    with ll.disabled(model): ...      # the base function inside, the adapter kept in place
    ll.detach(model)                  # the model is back, bit for bit
    ll.load(model, "a.safetensors")   # fresh base + file -> the adapted model
    ll.merge(model)                   # fold the adapter into the base: a plain model again
    ll.export_peft(model, "folder")   # a PEFT adapter folder (ll.load reads those too)
    ll.load(model, "b.safetensors", name="chat")   # several adapters, each under a name
    ll.use(model, ["default", "chat"], weights=[1.0, 0.5])   # the active set, summed
    with ll.rows(model, ["chat", None, "default"]): model(**batch)   # one adapter per row

Variants come from plugins (entry-point group ``lora_lite``); core ships none. The installed
plugins' config classes are attributes too, as in upstream lora-lite: ``ll.LoRAConfig(r=8)``.
"""
from . import _moved
from .adapter_file import load, read_header, save
from .attach import adapter_names, adapter_tensors, attach, attached, detach, set_trainable, trainable_parameters
from .calibration import call_model, stream_inputs
from .combine import combine
from .config import FLOAT32_MAX, AdapterConfig, check, config, is_finite_number, knob
from .errors import (
    AdapterFileError,
    AdapterSaveError,
    AttachError,
    CalibrationError,
    ConfigError,
    LoraLiteError,
    VariantContractError,
    VariantNotInstalled,
)
from .layers.kinds import kind_family, project_in, project_out, project_out_add
from .layers.weights import base_dense_weight, dense_weight, set_dense_weight
from .merge import merge
from .plugins import get_plugin_manager, get_variant, installed_plugins, problems, variants
from .plugins.hookspecs import hookimpl
from .routing import disabled, forward_mixed, rows, use, using
from .targets import Target, describe_candidates, find_targets, linear_layers
from .variant import ParamSpec, Variant, hook_kind, rewrites_base


def _installed_version(distribution):
    """The version the installed distribution reports (all come from the repository's VERSION)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(distribution)
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


__version__ = _installed_version("lora-lite")
_moved.install()

# PEFT interop loads on first use, so the runtime (attach, save, load of lora-lite files) never does
_LAZY = {
    "export_peft": ".peft.export", "load_peft_adapters": ".peft.folders", "peft_tensor": ".peft.load",
    **dict.fromkeys(("load_peft_low_rank_state", "peft_lora_config", "peft_lora_fields", "peft_low_rank_state",
                     "peft_patterns"), ".peft.lora"),
}

__all__ = [
    "FLOAT32_MAX", "AdapterConfig", "AdapterFileError", "AdapterSaveError", "AttachError", "CalibrationError",
    "ConfigError",
    "LoraLiteError",
    "ParamSpec", "Target", "Variant", "VariantContractError", "VariantNotInstalled",
    "adapter_names", "adapter_tensors", "attach", "attached", "base_dense_weight", "call_model",
    "check", "combine", "config", "dense_weight", "describe_candidates", "detach", "disabled", "export_peft",
    "find_targets", "forward_mixed", "get_plugin_manager", "get_variant", "hook_kind", "hookimpl",
    "installed_plugins", "is_finite_number", "kind_family", "knob", "linear_layers", "load", "load_peft_adapters",
    "load_peft_low_rank_state",
    "merge", "peft_lora_config", "peft_lora_fields", "peft_low_rank_state", "peft_patterns",
    "peft_tensor", "problems", "project_in", "project_out", "project_out_add", "read_header", "rewrites_base",
    "rows", "save", "set_dense_weight", "set_trainable", "stream_inputs", "trainable_parameters",
    "use", "using", "variants",
]


def __getattr__(attr):
    """The PEFT helpers (imported on first use), and ``ll.LoRAConfig``, ``ll.HRAConfig``, ...: the
    config class of an installed variant, found by its class name (as upstream lora-lite exported them)."""
    if attr.startswith("__"):
        raise AttributeError(attr)
    if attr in _LAZY:
        from importlib import import_module
        return getattr(import_module(_LAZY[attr], __name__), attr)
    configs = {cls.config.__name__: cls.config for cls in variants().values()}
    if attr in configs:
        return configs[attr]
    raise AttributeError(_missing_attribute(attr, sorted(c for c in configs if c)))


def _missing_attribute(attr, config_names):
    msg = f"module 'lora_lite' has no attribute {attr!r}"
    if not attr.endswith("Config"):
        return msg
    wanted = attr[:-len("Config")].lower()
    known = [p for p in problems() if p.variant and p.variant.replace("_", "") == wanted]
    if known:
        return f"{msg}: {known[0]}"
    msg += (": no installed plugin provides a config class of that name; install the plugin of "
            "that variant (lora-lite plugins lists what is installed)")
    return msg + (f"; installed: {', '.join(config_names)}" if config_names else "")
