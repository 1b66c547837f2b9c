"""VeRA — Kopiczko et al. 2024, https://arxiv.org/abs/2310.11454

    y' = y + λ_b ⊙ ( B (λ_d ⊙ (A x)) ),   A (r, d_in), B (d_out, r): frozen, random, shared
                                          λ_d (r) = d_initial, λ_b (d_out) = 0: trained

A and B are never trained and never saved: they are regenerated from ``projection_seed`` and
the layer shape, so every layer of the same shape (and the same seed, rank, dtype, device)
shares one A and one B in memory. λ_b = 0 makes the adapter exactly the identity at init.
Same math and init as PEFT's VeRA (vera_lambda_d, vera_lambda_b; A and B kaiming-uniform),
except that PEFT draws one A/B pair sized to the largest target and slices it per layer, while
here each shape gets its own pair (so adding a target never changes the others' projections).

Files store λ_d, λ_b and a 4-number fingerprint of A and B, so a load on a machine whose random
stream differs fails loudly instead of silently giving other outputs.

Interop: merges to W + diag(λ_b) B diag(λ_d) A; exports to PEFT's VeraConfig with
save_projection=True (vera_lambda_b/d per layer, the pair as base_model.vera_A / vera_B; PEFT
shares one pair, so all targets must have one shape). Imports PEFT folders that saved their
projections: ``store_projections=True`` then keeps A and B as saved per-layer buffers (in the
file) instead of regenerating them from the seed.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

import lora_lite as ll


@dataclass
class VeRAConfig(ll.AdapterConfig):
    variant: str = "vera"
    r: int = 256                  # VeRA wants larger ranks than LoRA: only λ_d grows with r
    projection_seed: int = ll.knob(0, "[0, 2**63)")  # regenerates the frozen A and B (PEFT: projection_prng_key)
    d_initial: float = 0.1        # initial value of every λ_d entry (PEFT's default), not 0
    store_projections: bool = False  # save A and B in the file (imported PEFT projections)

    def validate(self):
        super().validate()
        ll.check(self.d_initial != 0, "d_initial", self.d_initial, "a finite non-zero number (λ_b "
                 "starts at 0, so with λ_d = 0 too neither vector would ever get a gradient)")


def _kaiming_uniform(shape, generator):
    """U(-b, b) with b = sqrt(6 / fan_in), fan_in = shape[1]: PEFT's ``_kaiming_init``."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(seed, r, d_in, d_out):
    """The frozen (A (r, d_in), B (d_out, r)) of one layer shape, fp32 on the CPU."""
    shape_seed = ((seed * 1_000_003 + d_in) * 1_000_003 + d_out) % 2**63
    generator = torch.Generator().manual_seed(shape_seed)
    A = _kaiming_uniform((r, d_in), generator)
    B = _kaiming_uniform((d_out, r), generator)
    return A, B


def _fingerprint(A, B):
    return torch.stack([A.flatten()[0], A.flatten()[-1], B.flatten()[0], B.flatten()[-1]]).float()


# (seed, r, d_in, d_out, dtype, device, "A"|"B") -> the tensor every such layer shares.
# Weak values: once the last adapter using a pair is detached, the pair is freed.
_shared: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


class VeRA(ll.Variant):
    name = "vera"
    config = VeRAConfig
    paper = "https://arxiv.org/abs/2310.11454"
    # What lora-lite-cli and its reports use (all optional): only the scaling vectors train,
    # so a larger lr: 50% at 1e-2, 72% at 3e-2 on the default run.
    train_defaults = {"lr": 3e-2}
    peft_cost_note = "PEFT slices the shared A/B to each layer's shape"

    def added_macs(target, cfg):
        # x Aᵀ (r·d_in), the λ_d gain, then · Bᵀ (d_out·r), per token
        return cfg.r * (target.d_in + target.d_out), 0

    def param_specs(d_in, d_out, cfg):
        return {
            # frozen and not saved: filled from the seed by init() on every attach and load
            "lora_vera_A": ll.ParamSpec((cfg.r, d_in), trainable=False,
                                        persistent=cfg.store_projections),
            "lora_vera_B": ll.ParamSpec((d_out, cfg.r), trainable=False,
                                        persistent=cfg.store_projections),
            "lora_lambda_d": ll.ParamSpec((cfg.r,), init=lambda t, g: t.fill_(cfg.d_initial)),
            "lora_lambda_b": ll.ParamSpec((d_out,), init="zeros"),
            # saved, checked at load: the regenerated A and B are the ones it was trained with
            "lora_vera_fingerprint": ll.ParamSpec((4,), trainable=False),
        }

    def init(layer, cfg):
        # Swap the placeholders for the pair every layer of this shape shares.
        r, d_in = layer.lora_vera_A.shape
        d_out = layer.lora_vera_B.shape[0]
        if cfg.store_projections:  # this layer's own saved copies (filled by load)
            A, B = projections(cfg.projection_seed, r, d_in, d_out)
            with torch.no_grad():
                layer.lora_vera_A.copy_(A)
                layer.lora_vera_B.copy_(B)
                layer.lora_vera_fingerprint.copy_(_fingerprint(A, B))
            return
        dtype, device = layer.lora_vera_A.dtype, layer.lora_vera_A.device
        key = (cfg.projection_seed, r, d_in, d_out, dtype, device)
        A, B = _shared.get(key + ("A",)), _shared.get(key + ("B",))
        if A is None or B is None:
            A, B = (t.to(device=device, dtype=dtype)
                    for t in projections(cfg.projection_seed, r, d_in, d_out))
            _shared[key + ("A",)], _shared[key + ("B",)] = A, B
        layer.register_buffer("lora_vera_A", A, persistent=False)
        layer.register_buffer("lora_vera_B", B, persistent=False)
        with torch.no_grad():
            layer.lora_vera_fingerprint.copy_(_fingerprint(A, B))

    def after_load(layer, cfg):
        stored = layer.lora_vera_fingerprint.float()
        regenerated = _fingerprint(layer.lora_vera_A, layer.lora_vera_B).to(stored.device)
        if not torch.allclose(stored, regenerated, rtol=1e-2, atol=1e-3):
            raise ll.AdapterFileError(
                f"{layer._lora_name}: the VeRA projections regenerated from projection_seed="
                f"{cfg.projection_seed} differ from the ones this adapter was trained with "
                f"(fingerprint {regenerated.tolist()} vs stored {stored.tolist()}); this torch "
                f"({torch.__version__}) draws a different random stream: load it with the torch "
                "version that saved it")

    def forward(layer, x, y, cfg):
        # x: (..., d_in) in cfg.dtype; y: (..., d_out) base output
        h = layer.lora_lambda_d * (x @ layer.lora_vera_A.T)        # (..., r)
        delta = layer.lora_lambda_b * (h @ layer.lora_vera_B.T)    # (..., d_out)
        return y + delta.to(y.dtype)

    def merged_weight(layer, cfg):
        B_scaled = layer.lora_vera_B.float() * layer.lora_lambda_d.float()   # (d_out, r)
        delta = layer.lora_lambda_b.float()[:, None] * (B_scaled @ layer.lora_vera_A.float())
        return ll.dense_weight(layer) + delta, None

    def peft_config(cfg, target_names):
        return {"peft_type": "VERA", "target_modules": list(target_names), "r": cfg.r, "d_initial": cfg.d_initial,
                "projection_prng_key": cfg.projection_seed % 2**31, "save_projection": True,
                "vera_dropout": 0.0, "bias": "none", "init_weights": True}

    def peft_state(layer, cfg):
        return {"vera_lambda_b": layer.lora_lambda_b, "vera_lambda_d": layer.lora_lambda_d,
                "base_model.vera_A": layer.lora_vera_A, "base_model.vera_B": layer.lora_vera_B}

    def from_peft(peft_config):
        if peft_config.get("peft_type") != "VERA":
            return None
        if not peft_config.get("save_projection", True):
            raise ll.ConfigError("save_projection=False: the folder lacks PEFT's projections "
                                 "vera_A / vera_B, which only PEFT's own generator can rebuild")
        return {"r": int(peft_config.get("r", 256)),
                "d_initial": float(peft_config.get("d_initial", 0.1)), "store_projections": True}

    def load_peft_state(layer, cfg, tensors):
        r, d_in = layer.lora_vera_A.shape
        d_out = layer.lora_vera_B.shape[0]
        for key in ("base_model.vera_A", "base_model.vera_B"):
            if key not in tensors:
                raise ValueError(f"missing tensor {key!r} (PEFT's shared projections)")
        A = tensors["base_model.vera_A"][:, :d_in]            # PEFT slices its shared pair
        B = tensors["base_model.vera_B"][:d_out, :]
        layer.lora_vera_A.copy_(ll.peft_tensor({"A": A}, "A", (r, d_in)))
        layer.lora_vera_B.copy_(ll.peft_tensor({"B": B}, "B", (d_out, r)))
        layer.lora_vera_fingerprint.copy_(_fingerprint(layer.lora_vera_A, layer.lora_vera_B))
        layer.lora_lambda_b.copy_(ll.peft_tensor(tensors, "vera_lambda_b", layer.lora_lambda_b.shape))
        layer.lora_lambda_d.copy_(ll.peft_tensor(tensors, "vera_lambda_d", layer.lora_lambda_d.shape))
