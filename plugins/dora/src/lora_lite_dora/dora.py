"""DoRA — Liu et al. 2024, https://arxiv.org/abs/2402.09353

    g = m / sg(‖W + s·sg(B A)‖_row),   y' = y + (g − 1)·(y − b) + g·s·(x Aᵀ) Bᵀ,   s = alpha / r
    (= g ⊙ (x (W + s·B A)ᵀ) + b: the bias passes unscaled, as in PEFT's use_dora=True)

A (r, d_in) kaiming-uniform, B (d_out, r) zeros, m (d_out) = ‖W‖_row (the L2 norm of each output
row over d_in). At init B = 0 and m is computed by the same function as the norm in the forward,
so g = 1 exactly and the output is bit for bit the base's. The norm is detached (paper §4.3).

The norm without a dense copy of W (``factored_norm=True``, the default): per output row i,

    ‖W_i + s·(B A)_i‖² = ‖W_i‖² + 2s·Σ_k B_ik (A Wᵀ)_ki + s²·(B G B)_ii,   G = A Aᵀ (r × r)

‖W‖²_row is read once at attach (``lora_w_norm2``, d_out numbers, a non-persistent buffer); A Wᵀ
is what the base layer computes when fed A's r rows as inputs, so it runs through the layer's
own kernel (bitsandbytes 4bit/8bit included; the bias is subtracted) and W is never
materialised; the last term is r × r work. Adapter memory is LoRA's plus 2·d_out numbers. On an
8bit base the cross term carries the int8 kernel's activation rounding (as the base output
does); at init B = 0 makes both B terms exactly 0, so g = 1 exactly on every base.

``factored_norm=False`` computes ‖W + s·B A‖_row from the dense weight instead. W is then read
once at attach into ``lora_weight_cache`` (a non-persistent buffer: never saved, not in the
state_dict, d_out·d_in numbers per target in cfg.dtype), or, with ``cache_weight=False``, through
ll.dense_weight on every forward (never mutating the layer; safe on 8bit layers that have run).

Interop: merges to W' = g ⊙_row (W + s·B A) (bias unchanged); exports to / imports from PEFT's
LoraConfig(use_dora=True) (lora_magnitude_vector = m; rank_pattern / alpha_pattern become
per-target ``overrides``; ``use_rslora`` scales by alpha / √r).
"""
import math
from dataclasses import dataclass

import torch

import lora_lite as ll


@dataclass
class DoRAConfig(ll.AdapterConfig):
    variant: str = "dora"
    factored_norm: bool = True  # the row norm from ‖W‖_row, the base kernel on A, and r × r work
    cache_weight: bool = False  # (factored_norm=False) keep a dense copy of W instead of re-reading
    use_rslora: bool = False    # scale alpha / sqrt(r) (rsLoRA) instead of alpha / r

    def validate(self):
        super().validate()
        ll.check(not (self.factored_norm and self.cache_weight), "cache_weight", self.cache_weight,
                 "False with factored_norm=True (the factored norm keeps no dense copy of W); "
                 "set factored_norm=False to use the cache")
        ll.check(abs(self.scale) <= ll.FLOAT32_MAX ** 0.5, "alpha", self.alpha,
                 "a number whose scale (alpha / r, or alpha / sqrt(r) with use_rslora) is at "
                 "most 1.8e19 in size: the row norm squares it in float32")

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


# PEFT inits that rewrote the base weight (the adapter is relative to that): refused at import
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


def dense_base(layer, cfg):
    """The frozen base weight W, (d_out, d_in) in cfg.dtype."""
    if hasattr(layer, "lora_weight_cache"):
        return layer.lora_weight_cache
    return ll.dense_weight(layer).to(cfg.dtype)


def base_times_A(layer, like):
    """A Wᵀ as (d_out, r) fp32: the base layer's own forward (no hooks) fed A's rows, minus b."""
    out = layer.forward(layer.lora_A.to(like.dtype)).float()      # (r, d_out)
    bias = getattr(layer, "bias", None)
    if bias is not None:
        out = out - bias.float()
    return out.T


def factored_norm2(layer, cfg, AWt):
    """‖W + s·B A‖²_row (d_out,) from ‖W‖²_row, AWt = (A Wᵀ)ᵀ (d_out, r) and G = A Aᵀ."""
    s = cfg.scale
    A, B = layer.lora_A.float(), layer.lora_B.float()
    cross = (B * AWt).sum(dim=1)                                      # (d_out,)
    ba2 = ((B @ (A @ A.T)) * B).sum(dim=1)                            # (d_out,)
    return layer.lora_w_norm2 + 2.0 * s * cross + (s * s) * ba2


def row_norm(layer, cfg, like=None):
    """sg(‖W + s·B A‖_row), (d_out,): computed in fp32, returned in the dtype of m."""
    with torch.no_grad():
        if cfg.factored_norm:
            AWt = base_times_A(layer, layer.lora_A if like is None else like)
            return factored_norm2(layer, cfg, AWt).clamp_min(0).sqrt().to(layer.lora_m.dtype)
        BA = layer.lora_B.float() @ layer.lora_A.float()              # (d_out, d_in)
        V = dense_base(layer, cfg).float() + cfg.scale * BA
        return torch.linalg.norm(V, dim=1).to(layer.lora_m.dtype)


class DoRA(ll.Variant):
    name = "dora"
    config = DoRAConfig
    paper = "https://arxiv.org/abs/2402.09353"
    train_defaults = {"lr": 2e-3}
    cost_note = ("A Wᵀ (r·d_in·d_out) once per call through the base layer, spread over the "
                 "batch's tokens, plus r×r terms; on a bitsandbytes base that product runs in "
                 "its kernel, which torch's FLOP counter does not see")
    peft_cost_note = "PEFT's DoRA also forms B·A (and W + s·B·A) once per call"

    def added_macs(target, cfg):
        # the LoRA path per token, and B·A once per call for the norm of W + s·B·A
        return cfg.r * (target.d_in + target.d_out), target.d_out * cfg.r * target.d_in

    def param_specs(d_in, d_out, cfg):
        specs = {
            "lora_A": ll.ParamSpec((cfg.r, d_in), init="kaiming"),
            "lora_B": ll.ParamSpec((d_out, cfg.r), init="zeros"),
            "lora_m": ll.ParamSpec((d_out,), init="ones"),   # set to ‖W‖_row by init
        }
        if cfg.factored_norm:
            specs["lora_w_norm2"] = ll.ParamSpec((d_out,), trainable=False, persistent=False)
        elif cfg.cache_weight:
            specs["lora_weight_cache"] = ll.ParamSpec((d_out, d_in), trainable=False,
                                                      persistent=False)
        return specs

    def init(layer, cfg):
        with torch.no_grad():
            if cfg.factored_norm:
                # ‖W‖²_row; with B = 0 the forward's norm is sqrt(this + 0 + 0): the same number
                layer.lora_w_norm2.copy_(ll.dense_weight(layer).pow(2).sum(dim=1))
                layer.lora_m.copy_(layer.lora_w_norm2.clamp_min(0).sqrt())
                return
            if cfg.cache_weight:
                layer.lora_weight_cache.copy_(ll.dense_weight(layer))
            layer.lora_m.copy_(row_norm(layer, cfg))   # B = 0 here, so this is ‖W‖_row

    def forward(layer, x, y, cfg):
        # x: (..., d_in) in cfg.dtype; y: (..., d_out) base output in the layer's dtype
        g = layer.lora_m / row_norm(layer, cfg, like=y)                    # (d_out,), grad to m only
        bias = getattr(layer, "bias", None)
        base = (y if bias is None else y - bias).to(x.dtype)          # x Wᵀ, (..., d_out)
        lora = (x @ layer.lora_A.T) @ layer.lora_B.T                   # (..., d_out)
        return y + ((g - 1) * base + g * cfg.scale * lora).to(y.dtype)

    def merged_weight(layer, cfg):
        V = ll.dense_weight(layer) + cfg.scale * (layer.lora_B.float() @ layer.lora_A.float())
        g = layer.lora_m.float() / torch.linalg.norm(V, dim=1)       # (d_out,)
        return g[:, None] * V, None                                  # bias passes unscaled

    def peft_config(cfg, target_names):
        return ll.peft_lora_config(target_names, cfg.r, cfg.alpha, use_dora=True,
                                   use_rslora=cfg.use_rslora, **ll.peft_patterns(cfg, target_names))

    def peft_state(layer, cfg):
        return {"lora_A.weight": layer.lora_A, "lora_B.weight": layer.lora_B,
                "lora_magnitude_vector": layer.lora_m}

    def from_peft(peft_config):
        if peft_config.get("peft_type") != "LORA" or not peft_config.get("use_dora"):
            return None
        return ll.peft_lora_fields(peft_config, holds="A, B and m",
                                   refused_inits=BASE_REWRITING_INITS)

    def load_peft_state(layer, cfg, tensors):
        layer.lora_A.copy_(ll.peft_tensor(tensors, "lora_A.weight", layer.lora_A.shape))
        layer.lora_B.copy_(ll.peft_tensor(tensors, "lora_B.weight", layer.lora_B.shape))
        layer.lora_m.copy_(ll.peft_tensor(tensors, "lora_magnitude_vector", layer.lora_m.shape))
