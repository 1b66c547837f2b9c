"""LoRA — Hu et al. 2021, https://arxiv.org/abs/2106.09685

    y' = y + s · (x Aᵀ) Bᵀ,   s = alpha / r,   A (r, d_in) kaiming-uniform,  B (d_out, r) = 0

B = 0 makes the adapter exactly the identity at init. Same parameterisation as PEFT's LoRA
(lora_A.weight = A, lora_B.weight = B, scaling = alpha / r), no dropout. ``use_rslora=True``
scales by alpha / √r instead (rsLoRA, PEFT's use_rslora). Merges exactly (W' = W + s·B A),
exports to and imports from PEFT as it is (rank_pattern / alpha_pattern become per-target
``overrides``).
"""
import math
import re
from dataclasses import dataclass

import lora_lite as ll

# LoraConfig settings whose adapters are more than A and B on linear layers (or whose init
# rewrote the base weight): refused at import, naming the field.
UNSUPPORTED_FIELDS = ("lora_bias", "layer_replication", "target_parameters", "fan_in_fan_out",
                      "trainable_token_indices", "use_qalora", "alora_invocation_tokens",
                      "arrow_config", "megatron_config")
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass
class LoRAConfig(ll.AdapterConfig):
    variant: str = "lora"
    use_rslora: bool = False    # scale alpha / sqrt(r) (rsLoRA) instead of alpha / r

    def validate(self):
        super().validate()
        ll.check(isinstance(self.use_rslora, bool), "use_rslora", self.use_rslora, "True or False")

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


def lora_fields(peft_config: dict) -> dict:
    """lora-lite fields (r, alpha, use_rslora, overrides) of a PEFT LoraConfig; refuses what a
    plain A, B pair on linear layers cannot hold, naming the field."""
    for name in UNSUPPORTED_FIELDS:
        if peft_config.get(name):
            raise ll.ConfigError(f"{name}={peft_config[name]!r}: lora-lite imports LoRA adapters "
                                 "made of A and B on linear layers only")
    if int(peft_config.get("r", 8)) < 1:
        raise ll.ConfigError(f"r={peft_config['r']} (rank {peft_config['r']}): an adapter of rank "
                             "0 is no adapter")
    init = str(peft_config.get("init_lora_weights", True)).lower()
    if init.startswith(BASE_REWRITING_INITS):
        raise ll.ConfigError(f"init_lora_weights={peft_config['init_lora_weights']!r}: this adapter "
                             "is relative to a rewritten base; convert it to plain LoRA in PEFT "
                             "(save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    # keys: module names or dotted suffixes (core refuses any other key), matched as PEFT does
    overrides = [(rf"(^|\.){re.escape(p)}$", {"r": int(r)})
                 for p, r in (peft_config.get("rank_pattern") or {}).items()]
    overrides += [(rf"(^|\.){re.escape(p)}$", {"alpha": float(a)})
                  for p, a in (peft_config.get("alpha_pattern") or {}).items()]
    return {"r": int(peft_config.get("r", 8)), "alpha": float(peft_config.get("lora_alpha", 8)),
            "use_rslora": bool(peft_config.get("use_rslora", False)), "overrides": tuple(overrides)}


def lora_peft_config(cfg, target_names) -> dict:
    """PEFT LoraConfig content for A, B of rank cfg.r (per-target ranks as rank_pattern)."""
    ranks, alphas = {}, {}
    for name in target_names:
        own = cfg.for_target(name)
        if own.r != cfg.r:
            ranks[re.escape(name)] = own.r
        if own.alpha != cfg.alpha:
            alphas[re.escape(name)] = own.alpha
    return {"peft_type": "LORA", "target_modules": list(target_names), "r": cfg.r,
            "lora_alpha": cfg.alpha, "bias": "none",
            "use_rslora": cfg.use_rslora, "use_dora": False, "init_lora_weights": True,
            "lora_dropout": 0.0, "rank_pattern": ranks, "alpha_pattern": alphas}


class LoRA(ll.Variant):
    name = "lora"
    config = LoRAConfig
    paper = "https://arxiv.org/abs/2106.09685"
    train_defaults = {"lr": 2e-3}

    @staticmethod
    def added_macs(target, cfg):
        # x Aᵀ (r·d_in) then · Bᵀ (d_out·r), per token
        return cfg.r * (target.d_in + target.d_out), 0

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {
            "lora_A": ll.ParamSpec((cfg.r, d_in), init="kaiming"),
            "lora_B": ll.ParamSpec((d_out, cfg.r), init="zeros"),
        }

    @staticmethod
    def forward(layer, x, y):
        # x: (..., d_in) in cfg.dtype; y: (..., d_out) base output
        delta = (x @ layer.lora_A.T) @ layer.lora_B.T  # (..., d_out)
        return y + layer._lora_cfg.scale * delta.to(y.dtype)

    @staticmethod
    def merged_weight(layer, cfg):
        W = ll.dense_weight(layer)                                   # (d_out, d_in) fp32
        return W + cfg.scale * (layer.lora_B.float() @ layer.lora_A.float()), None

    @staticmethod
    def peft_config(cfg, target_names):
        return lora_peft_config(cfg, target_names)

    @staticmethod
    def peft_state(layer, cfg):
        return {"lora_A.weight": layer.lora_A, "lora_B.weight": layer.lora_B}

    @staticmethod
    def from_peft(peft_config):
        if peft_config.get("peft_type") != "LORA" or peft_config.get("use_dora"):
            return None
        return lora_fields(peft_config)

    @staticmethod
    def load_peft_state(layer, cfg, tensors):
        layer.lora_A.copy_(ll.peft_tensor(tensors, "lora_A.weight", layer.lora_A.shape))
        layer.lora_B.copy_(ll.peft_tensor(tensors, "lora_B.weight", layer.lora_B.shape))
