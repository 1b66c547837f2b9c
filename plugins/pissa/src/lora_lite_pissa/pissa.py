"""PiSSA — Meng et al. 2024, https://arxiv.org/abs/2404.02948

    W = U diag(S) Vh (fp32 SVD),  B = U_r diag(√(S_r/s)),  A = diag(√(S_r/s)) Vh_r,  s = alpha / r
    W_res = W − s·B A  written back as the base weight;   y' = x W_resᵀ + b + s·(x Aᵀ) Bᵀ

The adapter starts on the top-r singular directions of W and the frozen base keeps the rest.
Dividing S_r by s before the square root (as PEFT's init_lora_weights="pissa" does) makes
s·B A = U_r diag(S_r) Vh_r for any alpha, so A, B and W_res equal PEFT's (up to SVD signs).

Quantized bases (bitsandbytes 4bit/8bit): W is the dequantized weight and W_res is requantized on
write, so at init the function moves by E = Q(W_res) − W_res. ``quant_iters`` = k > 0 refits the
adapter to what the stored residual leaves out, alternating as LoftQ does (Li et al. 2023,
https://arxiv.org/abs/2310.08659): B A ← top-r SVD of (W − Q(W_res)) / s, then W_res ← W − s·B A
is requantized, k times, ending on a refit. Each refit is the best rank-r correction for the residual actually stored.
When the write is exact (an fp32 base) nothing is refit: A, B and W_res are plain PiSSA.

``rewrite_base=False`` (the default) leaves the base weight alone and keeps the residual
implicit instead: y' = y + s·(x Aᵀ) Bᵀ − s·(x A0ᵀ) B0ᵀ, with A0, B0 the init factors as frozen,
unsaved buffers. That is PiSSA with an unquantized residual: exactly the identity at init on any
base, ``model.state_dict()`` / ``save_pretrained`` carry the untouched base weight, for one more
rank-r product per token and a frozen copy of A0, B0. ``rewrite_base=True`` is the paper's form
(W_res stored as the base; the state dict still shows the original weight).

Interop: merges to W' = W_stored + s·(B A − B0 A0); exports to PEFT relative to the *original*
base as a plain LoRA of rank 2r, [A; A0] and [B, −B0] with lora_alpha = 2·alpha (exact; PEFT's
own PiSSA conversion). PEFT's unconverted PiSSA folders are refused at import (their base is a
rewritten one).

Load re-runs this init on the fresh base (a deterministic function of W), which rebuilds the
residual; the file holds only A and B. Detach restores the original weight bit for bit (core
keeps the storage that set_dense_weight replaced).
"""
from dataclasses import dataclass

import torch

import lora_lite as ll


@dataclass
class PiSSAConfig(ll.AdapterConfig):
    variant: str = "pissa"
    quant_iters: int = ll.knob(1, "[0, 20]")  # refits of A, B to a requantized residual (0 = plain PiSSA)
    rewrite_base: bool = False  # True: write W_res into the base (opt-in; see the docstring)

    def validate(self):
        super().validate()
        ll.check(self.alpha > 0, "alpha", self.alpha,
                 "a number > 0: the factors are sqrt(S / s) with s = alpha / r")


def principal_factors(W, cfg):
    """Top-r factors of W (fp32 (d_out, d_in)) with s·B A = U_r diag(S_r) Vh_r, in cfg.dtype."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    root = torch.sqrt(S[: cfg.r] / cfg.scale)             # (r,)
    B = U[:, : cfg.r] * root                              # (d_out, r)
    A = root[:, None] * Vh[: cfg.r]                       # (r, d_in)
    return A.to(cfg.dtype), B.to(cfg.dtype)


def _write_once(layer, W, A, B, cfg):
    """Writes W − s·B A into the base; returns (what the base now stores, whether it is exact)."""
    residual = W - (cfg.scale * B.float()) @ A.float()  # PEFT's order of operations
    ll.set_dense_weight(layer, residual)
    stored = ll.dense_weight(layer)
    return stored, torch.equal(stored, residual)


def write_residual(layer, W, A, B, cfg):
    """W_res = W − s·B A into the base (requantized on bnb), refit ``quant_iters`` times."""
    stored, exact = _write_once(layer, W, A, B, cfg)
    for refit in range(1, cfg.quant_iters + 1):
        if exact:                                         # exact write: nothing to refit
            break
        A, B = principal_factors(W - stored, cfg)         # fit the adapter to what the stored residual leaves out of W
        if refit == cfg.quant_iters:
            break                                         # keep the residual this fit is for
        stored, exact = _write_once(layer, W, A, B, cfg)
    return A, B


class PiSSA(ll.Variant):
    name = "pissa"
    config = PiSSAConfig
    paper = "https://arxiv.org/abs/2404.02948"
    train_defaults = {"alpha": "r"}   # scale 1: the factors carry W's top-r part
    # on embeddings / convolutions W is the kind's dense view and x Aᵀ the layer's own lookup /
    # conv (ll.project_in, ll.project_out), as LoRA's
    layer_kinds = ("linear", "embedding", "conv")

    def added_macs(target, cfg):
        # rewrite_base=False keeps W and subtracts s·B0 A0 x in the hook: twice
        return cfg.r * (target.d_in + target.d_out) * (1 if getattr(cfg, "rewrite_base", True) else 2), 0

    def rewrites_weight(cfg):
        return cfg.rewrite_base  # the residual goes into the base only when asked (opt-in)

    def param_specs(d_in, d_out, cfg):
        ll.check(cfg.r <= min(d_in, d_out), "r", cfg.r,
                 f"at most min(d_in, d_out) = {min(d_in, d_out)}: PiSSA takes r singular vectors "
                 f"of a {d_out}x{d_in} weight")
        specs = {  # filled by init from the SVD
            "lora_A": ll.ParamSpec((cfg.r, d_in)),
            "lora_B": ll.ParamSpec((d_out, cfg.r)),
        }
        if not cfg.rewrite_base:  # the init factors, rebuilt by init at load
            specs["lora_A0"] = ll.ParamSpec((cfg.r, d_in), trainable=False, persistent=False)
            specs["lora_B0"] = ll.ParamSpec((d_out, cfg.r), trainable=False, persistent=False)
        return specs

    def init(layer, cfg):
        W = ll.dense_weight(layer)                        # fp32 (d_out, d_in), dequantized on bnb
        A, B = principal_factors(W, cfg)
        if cfg.rewrite_base:
            A, B = write_residual(layer, W, A, B, cfg)
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
            if not cfg.rewrite_base:
                layer.lora_A0.copy_(A)
                layer.lora_B0.copy_(B)

    def forward(layer, x, y, cfg):
        # x: (..., d_in) in cfg.dtype; y: (..., d_out) output of the (residual) base
        delta = ll.project_out(layer, ll.project_in(layer, x, layer.lora_A), layer.lora_B)
        if hasattr(layer, "lora_A0"):  # implicit residual: remove s·B0 A0 (a separate product,
            # so that at init the two are the same numbers and cancel exactly)
            delta = delta - ll.project_out(layer, ll.project_in(layer, x, layer.lora_A0),
                                           layer.lora_B0)
        return y + cfg.scale * delta.to(y.dtype)

    def merged_weight(layer, cfg):
        W = ll.dense_weight(layer) + cfg.scale * (layer.lora_B.float() @ layer.lora_A.float())
        if hasattr(layer, "lora_A0"):
            W = W - cfg.scale * (layer.lora_B0.float() @ layer.lora_A0.float())
        return W, None

    def peft_config(cfg, target_names):
        return ll.peft_lora_config(target_names, 2 * cfg.r, 2 * cfg.alpha)  # [A; A0], [B, -B0]

    def peft_training_config(cfg, target_names):
        # what a PEFT user trains: rank r on a base PEFT rewrites to W - s·B0 A0 at init
        return ll.peft_lora_config(target_names, cfg.r, cfg.alpha, init_lora_weights="pissa")

    def peft_state(layer, cfg):
        if hasattr(layer, "lora_A0"):
            A0, B0 = layer.lora_A0, layer.lora_B0
        else:  # rewrite_base=True: the init factors from the original weight (exact on fp32)
            A0, B0 = principal_factors(ll.base_dense_weight(layer), cfg)
        return ll.peft_low_rank_state(layer, torch.cat([layer.lora_A, A0.to(layer.lora_A.dtype)], dim=0),
                                      torch.cat([layer.lora_B, -B0.to(layer.lora_B.dtype)], dim=1))

    def from_peft(peft_config):
        return None  # converted PiSSA folders are plain LoRA (the lora variant imports them)
