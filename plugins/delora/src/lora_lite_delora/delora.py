"""DeLoRA — Bini et al. 2025 (ICLR'25), https://arxiv.org/abs/2503.18225

    y' = y + (λ/r) · ((x ⊙ w) Âᵀ) B̂ᵀ,   Â = A / max(‖aᵢ‖, 1e-4) (rows),  B̂ = B / max(‖bᵢ‖, 1e-4) (columns)

w (d_in) are the column norms ‖W_{:,j}‖₂ of the frozen base weight, read once at init through
``ll.dense_weight`` (dequantized, so right on bitsandbytes 4bit and 8bit bases, where upstream
reads the packed storage and gets meaningless norms) and cached in a buffer: the base cannot change while
attached. The buffer is not saved; ``init`` recomputes it from the base at load.
A (r, d_in) kaiming-uniform, B (d_out, r) = 0 (exact identity at init for any λ), λ a trainable
scalar initialised to ``lambda0``. Each rank-1 term has unit norm, so λ alone sets the strength
(‖ΔW_{:,j}‖ ≤ λ·w_j): direction and strength are decoupled. ``alpha`` is not used.

Same function as PEFT's DeloraConfig (ΔW = B diag(λ/r/(‖aᵢ‖‖bᵢ‖)) A · diag(w), norms not
detached, same clamp); lora-lite normalises A and B *before* multiplying instead of forming
the scale λ/(r‖aᵢ‖‖bᵢ‖). Equal in exact arithmetic (fp32 outputs agree to ~1e-7), but with B = 0
PEFT's scale is ≈ λ·1e4/(r‖aᵢ‖), which overflows fp16 (inf · 0 = NaN): here no intermediate
exceeds the size of the input, so fp16/bf16 adapters work with any λ.

lambda0 = 15 (PEFT's default and the authors' advice: "not too small, around 10-15", with a
learning rate 10-100x LoRA's). Upstream's benchmark uses 0.1 only to avoid the fp16 overflow
that the normalisation order above does not have; since λ moves by about one learning-rate step
per Adam step, a small λ0 keeps the adapter's reach tiny for many steps. λ0 must be > 0: at
λ = 0 every gradient is zero. λ has shape () here (PEFT: (1,)).

Interop: merges to W + B̂ diag(λ/r) Â diag(w); exports to / imports from PEFT's DeloraConfig
(delora_A, delora_B, delora_lambda, delora_w_norm; an imported w_norm is kept as stored).
"""
from dataclasses import dataclass

import torch

import lora_lite as ll

NORM_FLOOR = 1e-4  # PEFT's clamp on ‖aᵢ‖ and ‖bᵢ‖


@dataclass
class DeLoRAConfig(ll.AdapterConfig):
    variant: str = "delora"
    lambda0: float = ll.knob(15.0, "(0, inf)", why="at 0 the adapter gets no gradient; 10-15 is typical")
                           # initial λ, the strength bound (trainable)



class DeLoRA(ll.Variant):
    name = "delora"
    config = DeLoRAConfig
    paper = "https://arxiv.org/abs/2503.18225"
    train_defaults = {"lr": 1e-3}
    peft_cost_note = "PEFT's DeLoRA forward"

    def added_macs(target, cfg):
        return cfg.r * (target.d_in + target.d_out), 0

    def param_specs(d_in, d_out, cfg):
        def fill_lambda(t, generator):
            t.fill_(float(cfg.lambda0))
        return {
            "lora_A": ll.ParamSpec((cfg.r, d_in), init="kaiming"),
            "lora_B": ll.ParamSpec((d_out, cfg.r), init="zeros"),
            "lora_lambda": ll.ParamSpec((), init=fill_lambda),
            # derived from the base weight in init(); not saved
            "lora_wnorm": ll.ParamSpec((d_in,), init="ones", trainable=False, persistent=False),
        }

    def init(layer, cfg):
        with torch.no_grad():  # (d_out, d_in) -> per-input-column norms (d_in)
            layer.lora_wnorm.copy_(ll.dense_weight(layer).norm(dim=0))

    def forward(layer, x, y, cfg):
        A, B, r = layer.lora_A, layer.lora_B, cfg.r
        A_unit = A / A.norm(dim=1, keepdim=True).clamp_min(NORM_FLOOR)  # (r, d_in)
        B_unit = B / B.norm(dim=0, keepdim=True).clamp_min(NORM_FLOOR)  # (d_out, r)
        h = (x * layer.lora_wnorm) @ A_unit.T                            # (..., r)
        delta = (h * (layer.lora_lambda / r)) @ B_unit.T                 # (..., d_out)
        return y + delta.to(y.dtype)

    def merged_weight(layer, cfg):
        A, B = layer.lora_A.float(), layer.lora_B.float()
        A_unit = A / A.norm(dim=1, keepdim=True).clamp_min(NORM_FLOOR)  # (r, d_in)
        B_unit = B / B.norm(dim=0, keepdim=True).clamp_min(NORM_FLOOR)  # (d_out, r)
        delta = (B_unit * (layer.lora_lambda.float() / cfg.r)) @ A_unit * layer.lora_wnorm.float()
        return ll.dense_weight(layer) + delta, None

    def peft_config(cfg, target_names):
        return {"peft_type": "DELORA", "target_modules": list(target_names), "r": cfg.r, "delora_lambda": cfg.lambda0,
                "bias": "none", "init_weights": True, "module_dropout": 0.0}

    def peft_state(layer, cfg):
        return {"delora_A": layer.lora_A, "delora_B": layer.lora_B,
                "delora_lambda": layer.lora_lambda.reshape(1), "delora_w_norm": layer.lora_wnorm}

    def from_peft(peft_config):
        if peft_config.get("peft_type") != "DELORA":
            return None
        if peft_config.get("rank_pattern") or peft_config.get("lambda_pattern"):
            raise ll.ConfigError("rank_pattern / lambda_pattern: lora-lite's DeLoRA has one rank "
                                 "and one lambda0 for every target")
        return {"r": int(peft_config.get("r", 8)),
                "lambda0": float(peft_config.get("delora_lambda", 15.0))}

    def load_peft_state(layer, cfg, tensors):
        layer.lora_A.copy_(ll.peft_tensor(tensors, "delora_A", layer.lora_A.shape))
        layer.lora_B.copy_(ll.peft_tensor(tensors, "delora_B", layer.lora_B.shape))
        layer.lora_lambda.copy_(ll.peft_tensor(tensors, "delora_lambda", layer.lora_lambda.shape))
        if "delora_w_norm" in tensors:
            layer.lora_wnorm.copy_(ll.peft_tensor(tensors, "delora_w_norm", layer.lora_wnorm.shape))
