"""export_peft: write the attached adapter as a PEFT adapter folder (what PEFT, vLLM and TGI read).

    adapter_config.json          the variant's ``peft_config(cfg, target_names)``
    adapter_model.safetensors    'base_model.model.<module>.<tensor>' from ``peft_state(layer, cfg)``

A ``peft_state`` key that starts with ``base_model.`` is model-level (VeRA's shared projections):
every target must give the same tensor for it. Native exports are relative to the original base
(a variant that rewrote the base says so in its peft_state: PiSSA exports rank 2r).

``as_lora_rank=K`` instead converts each layer's weight delta, merged_weight − original weight,
into a plain LoRA of rank K by truncated SVD (K at or above the layer's rank: exact up to fp32
rounding), for variants PEFT lacks or for servers that take plain LoRA only. The relative
Frobenius error of each layer is reported. A delta that changes the bias cannot be carried by
plain LoRA and is refused.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from ..attach import one_adapter
from ..errors import AttachError, ConfigError
from ..layers.weights import base_dense_weight
from ..merge import merged_weights
from ..slots import as_adapter
from .lora import peft_lora_config, peft_low_rank_state

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MODULE_PREFIX = "base_model.model."


def export_peft(model, folder, as_lora_rank: int | None = None, name=None) -> dict:
    """Write ``folder``/adapter_config.json + adapter_model.safetensors; returns a report
    {"folder", "peft_type", "as_lora_rank", "layers": {name: {"relative_error"}} (SVD only),
    "max_relative_error"}. Everything is computed before the folder is written. ``name``: which
    adapter (needed when the model holds several)."""
    state = one_adapter(model, name, "export")
    from ..layers.mha import attention_names  # nn.MultiheadAttention: a target module, as in PEFT
    names = [t.name for t in state.targets] + attention_names(state.param_targets)
    if as_lora_rank is None:
        config, tensors, layers = _native(state, names)
    else:
        config, tensors, layers = _as_lora(model, state, names, as_lora_rank)
    base_name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    from ..layers.mha import PEFT_OUT_PROJ_FIXED
    config = {"base_model_name_or_path": base_name or None, "task_type": None,
              "inference_mode": True, "peft_version": ".".join(map(str, PEFT_OUT_PROJ_FIXED)),
              **config, "target_modules": names}
    from ..layers.mha import peft_prefix  # (an attention's weights go under target_modules)
    fused = [pt.name for pt in state.param_targets if peft_prefix(pt) is None]
    if fused:  # fused parameters (MoE experts): lora_lite.peft.params
        config["target_parameters"] = fused
    if state.trainable_modules:  # heads trained in full: PEFT's modules_to_save
        config["modules_to_save"] = [tm.name for tm in state.trainable_modules]
        tensors.update(_heads_tensors(state))
    write_folder(folder, config, tensors)
    errors = [v["relative_error"] for v in layers.values()]
    return {"folder": os.fspath(folder), "variant": state.cfg.variant,
            "peft_type": config["peft_type"], "as_lora_rank": as_lora_rank, "layers": layers,
            "max_relative_error": max(errors) if errors else 0.0}


def _heads_tensors(state) -> dict:
    from ..trainable_modules import trainable_tensors
    return {f"{MODULE_PREFIX}{k}": v.detach().to("cpu").contiguous().clone()
            for k, v in trainable_tensors(state).items()}


def _native(state, names):
    variant, cfg = state.variant, state.cfg
    make_config = variant.peft_config
    config = make_config(cfg, names) if callable(make_config) else None
    if config is None or variant.peft_state is None:
        raise AttachError(f"variant {cfg.variant!r} has no PEFT counterpart: pass as_lora_rank=K "
                          "(CLI: --as-lora-rank K) to export its weight delta as a plain LoRA of "
                          "rank K (truncated SVD, error reported per layer)")
    tensors = {}
    with torch.no_grad():
        for t in state.targets:
            with as_adapter(t.layer, state.name):
                pieces = variant.peft_state(t.layer, t.layer._lora_cfg)
            for key, value in pieces.items():
                value = value.detach().to("cpu").contiguous().clone()
                if key.startswith("base_model."):  # shared by all targets
                    if key in tensors and not (tensors[key].shape == value.shape
                                               and torch.equal(tensors[key], value)):
                        raise AttachError(
                            f"{t.name}: PEFT's {cfg.variant} shares {key!r} across all targets, but "
                            f"this adapter's targets hold different ones (different layer shapes?); "
                            "select targets of one shape, or pass as_lora_rank=K")
                    tensors[key] = value
                else:
                    tensors[f"{MODULE_PREFIX}{t.name}.{key}"] = value
    from .params import export_tensors
    tensors.update(export_tensors(state))
    return config, tensors, {}


def _as_lora(model, state, names, rank):
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"as_lora_rank: got {rank!r}, expected a positive integer")
    if state.param_targets:
        raise AttachError("as_lora_rank does not convert parameter targets (fused experts); "
                          "export natively (PEFT's target_parameters take plain low-rank adapters)")
    merged = merged_weights(model, name=state.name)
    tensors, layers = {}, {}
    with torch.no_grad():
        for t in state.targets:
            weight, bias = merged[t.name]
            if bias is not None and not torch.equal(bias, t.layer.bias.detach().float()):
                change = (bias - t.layer.bias.detach().float()).abs().max().item()
                raise AttachError(
                    f"{t.name}: variant {state.cfg.variant!r} changes this layer's bias (max "
                    f"|Δb| = {change:.3g}); a plain LoRA carries no bias change, so it cannot be "
                    "exported this way (ll.merge keeps it exactly)")
            A, B, err = low_rank(weight - base_dense_weight(t.layer), rank)
            for key, value in peft_low_rank_state(t.layer, A, B).items():  # 4-D on convs
                tensors[f"{MODULE_PREFIX}{t.name}.{key}"] = value.contiguous()
            layers[t.name] = {"relative_error": err}
    config = peft_lora_config(names, rank, rank)
    return config, tensors, layers


def low_rank(delta, rank):
    """(A (rank, d_in), B (d_out, rank), relative Frobenius error) with B A ≈ delta by truncated
    SVD; ranks past min(d_out, d_in) are zero-padded (exact)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, S.shape[0])
    root = S[:k].sqrt()
    B = torch.zeros(delta.shape[0], rank)
    A = torch.zeros(rank, delta.shape[1])
    B[:, :k] = U[:, :k] * root
    A[:k] = root[:, None] * Vh[:k]
    norm = torch.linalg.norm(delta)
    err = (torch.linalg.norm(delta - B @ A) / norm).item() if norm > 0 else 0.0
    return A.contiguous(), B.contiguous(), err


def write_folder(folder, config, tensors):
    """The two files; the weights first, the config last (a folder with a config is complete)."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    config_path = os.path.join(folder, CONFIG_FILE)
    if os.path.exists(config_path):
        os.remove(config_path)
    save_file(tensors, os.path.join(folder, WEIGHTS_FILE), metadata={"format": "pt"})
    tmp = config_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.replace(tmp, config_path)
