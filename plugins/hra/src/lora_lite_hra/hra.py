"""HRA, Householder Reflection Adaptation — Yuan et al. 2024, https://arxiv.org/abs/2405.17484

    x' = x H_{r-1} ⋯ H_1 H_0,   H_i = I − 2 v_i v_iᵀ,  v_i = u_i / ‖u_i‖,   y' = x' Wᵀ + b

an input pre-hook; W is never read or changed, so quantized bases work as they are. This is
PEFT's W' = W R with R = H_0 ⋯ H_{r-1} (x Rᵀ Wᵀ = x H_{r-1} ⋯ H_0 Wᵀ); lora_U (r, d_in) holds
PEFT's hra_u (d_in, r) transposed. PEFT builds the d_in × d_in R, and W R, on every forward.

Here no d_in × d_in matrix is ever built. The reflections only move x inside span(v_0..v_{r-1}),
so x after any number of them is x − c V with coefficients c = (x Vᵀ) K. K (r × r) is found by
applying the reflections one at a time, H_{r-1} first, to that coefficient form: H_i sends c to
c + 2 (x_cur · v_i) e_i with x_cur · v_i = (x Vᵀ)(e_i − K G[:, i]), G = V Vᵀ. A forward is then
two thin matmuls, O(r·d_in) per token, like LoRA; autograd keeps (tokens × r) tensors, not r
copies of x. (K is the compact-WY form of the product of reflections.)

Init (PEFT's symmetric init): r/2 kaiming-uniform vectors, each used twice, u_{2k} = u_{2k+1},
so H_{2k} H_{2k+1} = I: the identity in exact arithmetic, ~1e-7 relative in fp32. r must be even.

Interop: merges to W' = W Mᵀ with M = I − Vᵀ K V the product of reflections (bias unchanged);
exports to / imports from PEFT's HRAConfig (hra_u = lora_Uᵀ; apply_GS=False only).
"""
import math
from dataclasses import dataclass

import torch

import lora_lite as ll


@dataclass
class HRAConfig(ll.AdapterConfig):
    variant: str = "hra"

    def validate(self):
        super().validate()
        ll.check(self.r % 2 == 0, "r", self.r,
                 "an even number: HRA's identity init pairs equal reflections (u_2k = u_2k+1)")


def symmetric_init(t, generator):
    """PEFT's init: kaiming-uniform(a=√5) on a (d_in, r/2) tensor (so fan_in = r/2 and entries
    are U(±1/√(r/2)), which sets the step size Adam takes relative to u), each column used as
    two equal rows u_2k = u_2k+1 of lora_U (r, d_in)."""
    half = torch.empty(t.shape[1], t.shape[0] // 2)
    torch.nn.init.kaiming_uniform_(half, a=math.sqrt(5), generator=generator)
    t.copy_(half.T.repeat_interleave(2, dim=0))


def reflection_coefficients(V):
    """K (r, r) such that x H_{r-1} ⋯ H_0 = x − (x Vᵀ) K V for unit rows V (r, d_in)."""
    r = V.shape[0]
    G = V @ V.T                                   # (r, r) Gram matrix
    eye = torch.eye(r, dtype=V.dtype, device=V.device)
    K = torch.zeros_like(G)
    for i in reversed(range(r)):                  # H_{r-1} acts first, H_0 last
        # the current x's component along v_i is (x Vᵀ)(e_i − K G[:, i]); reflect it
        K = K + torch.outer(2.0 * (eye[:, i] - K @ G[:, i]), eye[i])
    return K


class HRA(ll.Variant):
    name = "hra"
    config = HRAConfig
    paper = "https://arxiv.org/abs/2405.17484"
    train_defaults = {"lr": 2e-3}
    cost_note = ("computed in compact-WY form: (x Vᵀ) K adds r² MACs/token, and "
                 "V Vᵀ (r²·d_in) and K (~r³) are built once per call")
    peft_cost_note = "PEFT builds the d_in×d_in product of reflections and W·R on every call"

    def added_macs(target, cfg):
        # r reflections x <- x - 2 (x·v) v: a dot and an axpy of d_in each
        return 2 * cfg.r * target.d_in, 0

    def param_specs(d_in, d_out, cfg):
        return {"lora_U": ll.ParamSpec((cfg.r, d_in), init=symmetric_init)}

    def forward_input(layer, x, cfg):
        # x: (..., d_in) in cfg.dtype. The r×r work runs in fp32 whatever cfg.dtype is.
        U = layer.lora_U.float()
        V = U / U.norm(dim=1, keepdim=True).clamp_min(1e-12)   # (r, d_in); a zero row reflects nothing
        K = reflection_coefficients(V).to(x.dtype)
        V = V.to(x.dtype)
        coeffs = (x @ V.T) @ K                     # (..., r)
        return x - coeffs @ V                       # (..., d_in)

    def merged_weight(layer, cfg):
        eye = torch.eye(layer.lora_U.shape[1], dtype=layer.lora_U.dtype, device=layer.lora_U.device)
        M = HRA.forward_input(layer, eye, cfg).float()                    # (d_in, d_in): rows e_i M
        return ll.dense_weight(layer) @ M.T, None

    def peft_config(cfg, target_names):
        return {"peft_type": "HRA", "target_modules": list(target_names), "r": cfg.r, "apply_GS": False, "bias": "none",
                "init_weights": True}

    def peft_state(layer, cfg):
        return {"hra_u": layer.lora_U.T.contiguous()}               # (d_in, r)

    def from_peft(peft_config):
        if peft_config.get("peft_type") != "HRA":
            return None
        if peft_config.get("apply_GS"):
            raise ll.ConfigError("apply_GS=True: lora-lite's HRA applies the plain reflections, "
                                 "not their Gram-Schmidt orthogonalisation")
        if peft_config.get("rank_pattern"):
            raise ll.ConfigError("rank_pattern: lora-lite's HRA has one r for every target")
        return {"r": int(peft_config.get("r", 8))}

    def load_peft_state(layer, cfg, tensors):
        U = ll.peft_tensor(tensors, "hra_u", layer.lora_U.T.shape)   # (d_in, r)
        layer.lora_U.copy_(U.T)
