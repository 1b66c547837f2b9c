"""PEFT's LoraConfig as a file format: the adapter_config.json of low-rank A, B pairs (peft_type
"LORA", also PEFT's home for use_dora and for data-initialised LoRAs). Core writes one for
``export_peft(as_lora_rank=K)``; a plugin whose adapters PEFT stores this way builds and reads its
config with these helpers. Fields and their checks only: what the tensors compute is the
variant's business.
"""
from __future__ import annotations

import re

from ..errors import ConfigError

PEFT_TYPE = "LORA"
# LoraConfig settings whose adapters are more than A and B (and a magnitude vector) on linear
# layers: refused at import, naming the field.
UNSUPPORTED_FIELDS = ("lora_bias", "layer_replication", "target_parameters", "fan_in_fan_out",
                      "trainable_token_indices", "use_qalora", "alora_invocation_tokens",
                      "arrow_config", "megatron_config", "use_bdlora", "kasa_config",
                      "monteclora_config", "lora_ga_config", "velora_config", "astra_config")
# LoraConfig fields that leave an A, B adapter's math as its tensors say (bookkeeping, training
# or init-time settings, or ones the import reads). Any other field set to a true value is
# refused: a newer PEFT's setting lora-lite does not know may change what the tensors compute.
# tests/test_hostile_peft.py checks that every field of the installed PEFT's LoraConfig is
# classified here or in UNSUPPORTED_FIELDS.
KNOWN_FIELDS = ("peft_type", "task_type", "peft_version", "auto_mapping", "revision",
                "base_model_name_or_path", "inference_mode", "r", "lora_alpha", "rank_pattern",
                "alpha_pattern", "target_modules", "exclude_modules", "layers_to_transform",
                "layers_pattern", "bias", "modules_to_save", "init_lora_weights", "use_rslora",
                "use_dora", "lora_dropout", "runtime_config", "ensure_weight_tying",
                "megatron_core", "qalora_group_size", "eva_config", "corda_config", "loftq_config")


def peft_lora_config(target_names, r, alpha, **fields) -> dict:
    """A LoraConfig dict for A, B of rank ``r`` on ``target_names``: plain init, no dropout, no
    bias, no rsLoRA or DoRA unless ``fields`` (any other LoraConfig field) say otherwise."""
    return {"peft_type": PEFT_TYPE, "target_modules": list(target_names), "r": r,
            "lora_alpha": alpha, "bias": "none", "init_lora_weights": True, "use_rslora": False,
            "use_dora": False, "lora_dropout": 0.0, **fields}


def peft_patterns(cfg, target_names) -> dict:
    """{"rank_pattern", "alpha_pattern"}: the targets whose ``cfg.for_target`` r / alpha differ
    from the config's own, keyed by the escaped module name (PEFT matches it as a suffix)."""
    ranks, alphas = {}, {}
    for name in target_names:
        own = cfg.for_target(name)
        if own.r != cfg.r:
            ranks[re.escape(name)] = own.r
        if own.alpha != cfg.alpha:
            alphas[re.escape(name)] = own.alpha
    return {"rank_pattern": ranks, "alpha_pattern": alphas}


def peft_lora_fields(peft_config: dict, holds: str, refused_inits=()) -> dict:
    """lora-lite fields (r, alpha, use_rslora, overrides) of a LoraConfig. Refused, naming the
    field: UNSUPPORTED_FIELDS, a rank of 0, an ``init_lora_weights`` starting with one of
    ``refused_inits``. ``holds`` says what the importing variant's adapters are made of (for the
    message). rank_pattern / alpha_pattern keys (literal module names or dotted suffixes: core
    refuses any other key) become per-target ``overrides``, matched as PEFT matches them."""
    for name in UNSUPPORTED_FIELDS:
        if peft_config.get(name):
            raise ConfigError(f"{name}={peft_config[name]!r}: lora-lite imports adapters made of "
                              f"{holds} on linear layers only")
    unknown = sorted(k for k, v in peft_config.items() if v and k not in KNOWN_FIELDS)
    if unknown:
        raise ConfigError(f"field {unknown[0][:60]!r} is set ({str(peft_config[unknown[0]])[:40]!r}), "
                          "a LoraConfig setting lora-lite does not know: it may change what the "
                          "adapter computes, so it is refused (unset it if it does not)")
    if int(peft_config.get("r", 8)) < 1:
        raise ConfigError(f"r={peft_config['r']} (rank {peft_config['r']}): an adapter of rank "
                          "0 is no adapter")
    init = str(peft_config.get("init_lora_weights", True)).lower()
    if refused_inits and init.startswith(tuple(refused_inits)):
        raise ConfigError(f"init_lora_weights={peft_config['init_lora_weights']!r}: this adapter "
                          "is relative to a rewritten base; convert it to plain LoRA in PEFT "
                          "(save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    overrides: list[tuple[str, dict[str, float]]] = [(rf"(^|\.){re.escape(p)}$", {"r": int(r)})
                 for p, r in (peft_config.get("rank_pattern") or {}).items()]
    overrides += [(rf"(^|\.){re.escape(p)}$", {"alpha": float(a)})
                  for p, a in (peft_config.get("alpha_pattern") or {}).items()]
    return {"r": int(peft_config.get("r", 8)), "alpha": float(peft_config.get("lora_alpha", 8)),
            "use_rslora": bool(peft_config.get("use_rslora", False)), "overrides": tuple(overrides)}


def peft_low_rank_state(layer, A, B) -> dict:
    """A (r, d_in) and B (d_out, r) as PEFT's LoRA stores them on this layer's kind:
    ``lora_A.weight`` / ``lora_B.weight`` (linear), ``lora_embedding_A`` (r, num_embeddings) /
    ``lora_embedding_B`` (embedding_dim, r) (nn.Embedding), or the 4-D (r, in, *kernel) and
    (out, r, 1, ...) conv kernels (nn.Conv1d/2d/3d)."""
    from ..layers.kinds import kind_family
    family = kind_family(layer)
    if family == "embedding":
        return {"lora_embedding_A": A, "lora_embedding_B": B}
    if family == "conv":
        ones = (1,) * len(layer.kernel_size)
        return {"lora_A.weight": A.reshape(A.shape[0], layer.in_channels, *layer.kernel_size),
                "lora_B.weight": B.reshape(*B.shape, *ones)}
    return {"lora_A.weight": A, "lora_B.weight": B}


def load_peft_low_rank_state(layer, tensors, A, B) -> None:
    """Copy PEFT's A and B of this layer's kind (``peft_low_rank_state``'s names) into A, B."""
    from .load import peft_tensor
    key_A, key_B = peft_low_rank_state(layer, A, B)
    A.copy_(peft_tensor(tensors, key_A, A.shape))
    B.copy_(peft_tensor(tensors, key_B, B.shape))
