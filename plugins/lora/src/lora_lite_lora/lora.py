"""LoRA — Hu et al. 2021, https://arxiv.org/abs/2106.09685

    y' = y + s · (x Aᵀ) Bᵀ,   s = alpha / r,   A (r, d_in) kaiming-uniform,  B (d_out, r) = 0

On nn.Embedding and nn.Conv1d/2d/3d (named in target_names) the same math runs through the
layer's own operation, as PEFT's LoRA does: ``x Aᵀ`` is ``ll.project_in`` (an embedding lookup
of Aᵀ; a conv with A as the kernel and the layer's stride/padding), ``· Bᵀ`` is
``ll.project_out`` (a 1x1 conv on channels); PEFT's tensor names and 4-D kernels on export.

B = 0 makes the adapter exactly the identity at init. Same parameterisation as PEFT's LoRA
(lora_A.weight = A, lora_B.weight = B, scaling = alpha / r), no dropout. ``use_rslora=True``
scales by alpha / √r instead (rsLoRA, PEFT's use_rslora). Merges exactly (W' = W + s·B A),
exports to and imports from PEFT as it is (rank_pattern / alpha_pattern become per-target
``overrides``).
"""
import math
from dataclasses import dataclass

import lora_lite as ll

# PEFT inits that rewrote the base weight (the adapter is relative to that): refused at import
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass
class LoRAConfig(ll.AdapterConfig):
    variant: str = "lora"
    use_rslora: bool = False    # scale alpha / sqrt(r) (rsLoRA) instead of alpha / r

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


class LoRA(ll.Variant):
    name = "lora"
    config = LoRAConfig
    paper = "https://arxiv.org/abs/2106.09685"
    train_defaults = {"lr": 2e-3}
    layer_kinds = ("linear", "embedding", "conv")

    def added_macs(target, cfg):
        # x Aᵀ (r·d_in) then · Bᵀ (d_out·r), per token
        return cfg.r * (target.d_in + target.d_out), 0

    def param_specs(d_in, d_out, cfg):
        return {
            "lora_A": ll.ParamSpec((cfg.r, d_in), init="kaiming"),
            "lora_B": ll.ParamSpec((d_out, cfg.r), init="zeros"),
        }

    def forward(layer, x, y, cfg):
        # x: (..., d_in) in cfg.dtype; y: (..., d_out) base output
        # (x @ A.T) @ B.T on linear layers; the layer's own lookup / conv otherwise
        h = ll.project_in(layer, x, layer.lora_A)                  # (..., r)
        return ll.project_out_add(layer, h, layer.lora_B, y, cfg.scale)  # y + s · h Bᵀ

    def merged_weight(layer, cfg):
        W = ll.dense_weight(layer)                                   # (d_out, d_in) fp32
        return W + cfg.scale * (layer.lora_B.float() @ layer.lora_A.float()), None

    # -- combining (ll.combine): read the factors, and be what a combination is made of -------
    def lowrank_factors(layer, cfg):
        return layer.lora_A, layer.lora_B, cfg.scale                 # delta = scale · B A

    def lowrank_config(rank, target_names):
        return LoRAConfig(r=rank, alpha=float(rank), target_names=tuple(target_names),
                          target_roles=())                           # unit scale, as PEFT's

    def load_lowrank(layer, cfg, A, B):
        layer.lora_A.copy_(A.to(layer.lora_A.dtype))
        layer.lora_B.copy_(B.to(layer.lora_B.dtype))

    def param_delta(view, cfg):
        # parameter targets (fused MoE experts): A (E, r, d_in), B (E, d_out, r) -> (E, d_out, d_in)
        return cfg.scale * (view.lora_B @ view.lora_A)

    def peft_param_state(view, cfg):
        # PEFT's lora.ParamWrapper: lora_A (r·E, d_in) expert-major, lora_B (d_out, r·E) expert-minor
        A, B = view.lora_A, view.lora_B                              # (E, r, d_in), (E, d_out, r)
        E, r, _ = A.shape
        return {"lora_A.weight": A.reshape(E * r, -1),
                "lora_B.weight": B.permute(1, 2, 0).reshape(B.shape[1], r * E)}

    def load_peft_param_state(view, cfg, tensors):
        E, r, d_in = view.lora_A.shape
        d_out = view.lora_B.shape[1]
        A = ll.peft_tensor(tensors, "lora_A.weight", (E * r, d_in)).reshape(E, r, d_in)
        B = ll.peft_tensor(tensors, "lora_B.weight", (d_out, r * E)).reshape(d_out, r, E)
        view.lora_A.copy_(A)
        view.lora_B.copy_(B.permute(2, 0, 1))

    def peft_config(cfg, target_names):
        return ll.peft_lora_config(target_names, cfg.r, cfg.alpha, use_rslora=cfg.use_rslora,
                                   **ll.peft_patterns(cfg, target_names))

    def peft_state(layer, cfg):
        return ll.peft_low_rank_state(layer, layer.lora_A, layer.lora_B)

    def from_peft(peft_config):
        if peft_config.get("peft_type") != "LORA" or peft_config.get("use_dora"):
            return None
        return ll.peft_lora_fields(peft_config, holds="A and B",
                                   refused_inits=BASE_REWRITING_INITS)

    def load_peft_state(layer, cfg, tensors):
        ll.load_peft_low_rank_state(layer, tensors, layer.lora_A, layer.lora_B)
