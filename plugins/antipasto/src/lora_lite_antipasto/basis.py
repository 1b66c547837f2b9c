"""What the AntiPaSTO family shares: the SVD crop of the base weight, the residual, and the
optional data-driven ("Wanda-style") re-selection of which singular directions to adapt.

SVD crop (PiSSA-style), per target layer with dense weight W (d_out, d_in):

    W = U diag(S) Vh            fp32 thin SVD of the dequantized base weight
    lora_U (d_out, r), lora_S (r), lora_Vh (r, d_in)   the kept directions: persistent buffers
    W_res = W - lora_U diag(lora_S) lora_Vh            written back through ll.set_dense_weight

The residual is computed from the factors *as stored* (already cast to cfg.dtype), so the base
layer plus an adapter at its neutral point reproduces W up to fp32 rounding (and, on a
bitsandbytes base, up to the requantization of W_res: see ``residual_error``). The adapter file
holds the factors only; ``after_load`` rebuilds W_res from the fresh base and the loaded factors.

``rewrite_base=False`` (the default) skips the rewrite: the base weight stays as it is and the
hook adds only the change U (C - I) diag(S) Vh (C the variant's core, I at init). Same function,
but the identity at init is bit-exact on every base, a quantized base is never requantized and
``model.state_dict()`` / ``save_pretrained`` carry the untouched base. ``rewrite_base=True`` is
upstream's form (opt-in; the state dict still shows the original weight).

Interop: every family member is linear in x, so it merges exactly: W' = W_stored + Δᵀ with Δ the
hook's additive term probed on the identity (Δ = f(I), one d_in × d_in forward). PEFT has no
AntiPaSTO: export only with ``as_lora_rank`` (truncated SVD of W' − W).

Direction re-selection (``group_init`` with calibration data; a no-op without): take the full
SVD of the original W, stream every target's non-padding input rows x through it batch by batch,
pool each direction's projection |x·v_i| over tokens (``rms`` = sqrt(mean (x·v_i)^2), or
``mean_abs``), score S_i · pool_i, and keep the r best-scoring directions (stored in descending-S
order). Only per-direction sums are accumulated, never the activations. Memory: the full SVD of
every target is held during the pass (about twice the targets' weights, fp32). The trainable
tensors are reset to their init afterwards (upstream kept stale values).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import lora_lite as ll

ACT_POOLS = ("rms", "mean_abs")
# The members with antipasto's bounded gain (antipasto, _rot, _arrow): alpha = r. Upstream ran
# 5000 steps at lr 5e-3; for the 80-step default run 1.5e-2 measured better: antipasto 58% -> 70%,
# rot 59% -> 71%, arrow 66% -> 67% (loss 0.14 -> 0.09).
GAIN_TRAIN_DEFAULTS = {"alpha": "r", "lr": 1.5e-2}


@dataclass
class SVDBasisConfig(ll.AdapterConfig):
    """Knobs shared by the family. ``alpha`` is unused (no alpha/r scale)."""

    variant: str = "antipasto_basis"
    r: int = 128             # upstream's 256 exceeds the kv-projection width of small models
    act_pool: str = ll.knob("rms", choices=ACT_POOLS)  # how group_init pools a direction's
                                                        # activations over tokens
    rewrite_base: bool = False  # True: write W_res into the base (opt-in); False: the hook adds
                                # only the change, the base weight stays as it is


def check_rank_fits(cfg, d_in, d_out):
    """r directions must exist: r <= min(d_in, d_out) for every target (checked at attach)."""
    ll.check(cfg.r <= min(d_in, d_out), "r", cfg.r,
             f"at most min(d_in, d_out) = {min(d_in, d_out)} for a target layer of shape "
             f"{d_in}->{d_out} (lower r, or narrow target_names to wider layers)")


def factor_specs(d_in, d_out, r, right="lora_Vh") -> dict:
    """The frozen factors U (d_out, r), S (r) and the right factor (r, d_in) named ``right``
    (the SVD's Vh, or an oblique input projector): persistent buffers (saved in the file),
    filled by ``init``."""
    return {
        "lora_U": ll.ParamSpec((d_out, r), init="zeros", trainable=False),
        "lora_S": ll.ParamSpec((r,), init="zeros", trainable=False),
        right: ll.ParamSpec((r, d_in), init="zeros", trainable=False),
    }


def thin_svd(layer):
    """(U, S, Vh) of the layer's original weight, fp32, on the layer's device."""
    weight = ll.base_dense_weight(layer)  # (d_out, d_in) fp32, as it was before any rewrite
    return torch.linalg.svd(weight, full_matrices=False)


@torch.no_grad()
def set_factors(layer, cfg, U, S, Vh, right="lora_Vh"):
    """Store the kept directions (cast to the buffers' dtype), then write the residual base
    weight from those (if cfg.rewrite_base)."""
    layer.lora_U.copy_(U)
    layer.lora_S.copy_(S)
    getattr(layer, right).copy_(Vh)
    write_residual(layer, cfg, right)


@torch.no_grad()
def write_residual(layer, cfg, right="lora_Vh"):
    """W_res = W - U diag(S) Vh from the original weight and the stored (cast) factors."""
    if not cfg.rewrite_base:
        return
    weight = ll.base_dense_weight(layer)
    low_rank = (layer.lora_U.float() * layer.lora_S.float()) @ getattr(layer, right).float()
    ll.set_dense_weight(layer, weight - low_rank)


def crop_top_r(layer, cfg):
    U, S, Vh = thin_svd(layer)
    set_factors(layer, cfg, U[:, :cfg.r], S[:cfg.r], Vh[:cfg.r])


@torch.no_grad()
def residual_error(layer) -> float:
    """max |W - (W_res as stored + U diag(S) Vh)| / max |W|: 0 up to rounding on dense layers;
    on bitsandbytes layers, the requantization error of the residual (the identity error).
    Exactly 0 with rewrite_base=False (the base weight is not touched)."""
    weight = ll.base_dense_weight(layer)
    rebuilt = ll.dense_weight(layer)
    if layer._lora_cfg.rewrite_base:
        rebuilt = rebuilt + (layer.lora_U.float() * layer.lora_S.float()) @ layer.lora_Vh.float()
    return ((rebuilt - weight).abs().max() / weight.abs().max()).item()


def direction_scores(model, targets, cfg, calibration_data) -> dict:
    """target name -> (score (k,), U, S, Vh) over all k = min(d_in, d_out) directions of the
    original weight, with score_i = S_i * pool_t |x_t · v_i| streamed over non-padding tokens."""
    svd, sums, counts = {}, {}, {}
    for t in targets:
        svd[t.name] = thin_svd(t.layer)
        sums[t.name] = torch.zeros_like(svd[t.name][1])
        counts[t.name] = 0

    def on_rows(target, rows):  # rows: (N, d_in) fp32, padding already removed
        projection = rows @ svd[target.name][2].T  # (N, k)
        pooled = projection.square() if cfg.act_pool == "rms" else projection.abs()
        sums[target.name] += pooled.sum(0)
        counts[target.name] += rows.shape[0]

    ll.stream_inputs(model, targets, calibration_data, on_rows)
    out = {}
    for t in targets:
        if counts[t.name] == 0:
            raise ValueError(f"calibration_data gave no (non-padding) input rows to {t.name}")
        pooled = sums[t.name] / counts[t.name]
        if cfg.act_pool == "rms":
            pooled = pooled.sqrt()
        U, S, Vh = svd[t.name]
        out[t.name] = (S * pooled, U, S, Vh)
    return out


def reselect_directions(model, targets, cfg, calibration_data):
    """Keep, per target, the r directions with the highest S_i * pool_i; rewrite the residual."""
    scored = direction_scores(model, targets, cfg, calibration_data)
    for t in targets:
        score, U, S, Vh = scored[t.name]
        keep = torch.topk(score, cfg.r).indices.sort().values  # ascending index = descending S
        set_factors(t.layer, cfg, U[:, keep], S[keep], Vh[keep])


@torch.no_grad()
def reset_trainable(layer, specs):
    for name, spec in specs.items():
        if not spec.trainable:
            continue
        if spec.init == "zeros":
            getattr(layer, name).zero_()
        elif spec.init == "ones":
            getattr(layer, name).fill_(1.0)
        else:
            raise NotImplementedError(f"cannot reset {name} (init {spec.init!r})")


class SVDBasisVariant(ll.Variant):
    """Base class of the family: crop at init, optional re-selection, residual rebuilt at load.
    Subclasses define ``name``, ``config``, ``trainable_specs`` and ``forward``;
    ``right_factor`` names the (r, d_in) buffer (the SVD's Vh unless a subclass says otherwise)."""

    needs_calibration = False
    supports_quantized = True
    paper = "https://arxiv.org/abs/2601.07473"
    right_factor = "lora_Vh"

    def rewrites_weight(cfg):
        return cfg.rewrite_base  # W_res goes into the base only when asked (opt-in)

    @classmethod
    def param_specs(cls, d_in, d_out, cfg):
        check_rank_fits(cfg, d_in, d_out)
        return {**factor_specs(d_in, d_out, cfg.r, cls.right_factor),
                **cls.trainable_specs(d_in, d_out, cfg)}

    def init(layer, cfg):
        crop_top_r(layer, cfg)

    @classmethod
    def group_init(cls, model, targets, cfg, calibration_data):
        if calibration_data is None:
            return  # plain top-r by singular value, as set by init
        reselect_directions(model, targets, cfg, calibration_data)
        for t in targets:
            reset_trainable(t.layer, cls.trainable_specs(t.d_in, t.d_out, cfg))

    @classmethod
    def after_load(cls, layer, cfg):
        # The loaded factors may be re-selected directions, not the plain top-r that init cropped.
        write_residual(layer, cfg, cls.right_factor)

    @classmethod
    def merged_weight(cls, layer, cfg):
        d_in, d_out = layer.lora_Vh.shape[1], layer.lora_U.shape[0]
        eye = torch.eye(d_in, dtype=cfg.dtype, device=layer.lora_Vh.device)
        zeros = torch.zeros(d_in, d_out, dtype=cfg.dtype, device=layer.lora_Vh.device)
        delta_t = cls.forward(layer, eye, zeros, cfg).float()            # (d_in, d_out) = Δᵀ
        return ll.dense_weight(layer) + delta_t.T, None

    def peft_config(cfg, target_names):
        return None  # PEFT has no AntiPaSTO: export_peft(..., as_lora_rank=K)

    def from_peft(peft_config):
        return None


def project(layer, x):
    """(..., d_in) -> (..., r): coordinates of x on the kept input directions."""
    return x @ layer.lora_Vh.T


def expand(layer, h):
    """(..., r) -> (..., d_out): back through the kept output directions."""
    return h @ layer.lora_U.T
