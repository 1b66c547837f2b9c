"""Dtype policy: adapters are created in cfg.dtype (fp32 by default) whatever the base's dtype, so
fp16/bf16 bases train fp32 adapter weights; after attach they follow ``model.to(dtype)`` /
``.half()`` / ``.bfloat16()`` and the hook runs the variant's math in their current dtype."""
import pytest
import torch
from tiny_knobs import NOT_IDENTITY_AT_INIT, TINY_KNOBS

import lora_lite as ll
from lora_lite.testing.tiny_models import ARCHS

ARCH = ARCHS["llama"]
VARIANTS = sorted(ll.variants())


def tiny_config(variant, **kw):
    fields = ll.get_variant(variant).config.__dataclass_fields__
    knobs = {"r": 4, "alpha": 8, **TINY_KNOBS.get(variant, {}), **kw}
    if "rewrite_base" in fields:
        knobs.setdefault("rewrite_base", False)   # exact on any base; True is measured below
    return ll.config(variant, **{k: v for k, v in knobs.items() if k in fields})


def attach(model, variant, batch, **kw):
    calib = [batch] if getattr(ll.get_variant(variant), "needs_calibration", False) else None
    ll.attach(model, tiny_config(variant, **kw), calibration_data=calib)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_half_precision_base_trains_fp32_adapter(variant, dtype):
    model, batch = ARCH.build().to(dtype), ARCH.batch()
    ref = ARCH.outputs(model, batch)
    attach(model, variant, batch)
    assert {t.dtype for t in ll.adapter_tensors(model).values() if t.is_floating_point()} == {torch.float32}
    if variant not in NOT_IDENTITY_AT_INIT:
        assert torch.equal(ARCH.outputs(model, batch), ref)      # identity, bit for bit
    params = ll.trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-3)                     # eps 1e-8 is fine in fp32
    model.train()
    for _ in range(2):
        opt.zero_grad()
        ARCH.loss(model, batch).backward()
        assert all(p.grad is None or (p.grad.dtype == torch.float32 and p.grad.isfinite().all())
                   for p in params)
        opt.step()
    assert all(p.isfinite().all() for p in params)
    model.eval()
    assert not torch.equal(ARCH.outputs(model, batch), ref)      # the step moved it


@pytest.mark.parametrize("variant", VARIANTS)
def test_adapter_follows_half_and_float_after_attach(variant):
    model, batch = ARCH.build(), ARCH.batch()
    attach(model, variant, batch)
    fp32 = ARCH.outputs(model, batch)
    model.half()
    assert {t.dtype for t in ll.trainable_parameters(model)} == {torch.float16}
    assert (ARCH.outputs(model, batch) - fp32).abs().max() < 5e-2 * fp32.abs().max()
    model.float()
    assert (ARCH.outputs(model, batch) - fp32).abs().max() < 5e-2 * fp32.abs().max()


def rewriting_variants():
    return [v for v in VARIANTS if "rewrite_base" in ll.get_variant(v).config.__dataclass_fields__
            and v not in NOT_IDENTITY_AT_INIT]


@pytest.mark.parametrize("variant", rewriting_variants())
def test_bf16_identity_error_of_base_rewrites_is_the_rounding_of_the_residual(variant):
    """rewrite_base=True stores W_res = W - ΔW in the base's own dtype: on a bf16 base the
    identity error is bf16's rounding of W_res (8 mantissa bits), not a bug of the variant: the
    same rewrite on an fp32 base is exact to fp32 rounding, and rewrite_base=False keeps W and
    is exact on any base."""
    errors = {}
    for dtype in (torch.bfloat16, torch.float32):
        model, batch = ARCH.build().to(dtype), ARCH.batch()
        ref = ARCH.outputs(model, batch)
        attach(model, variant, batch, rewrite_base=True)
        assert ll.attached(model).targets[0].layer.weight.dtype == dtype   # W_res in the base dtype
        errors[dtype] = ((ARCH.outputs(model, batch) - ref).abs().max() / ref.abs().max()).item()
        ll.detach(model)
        attach(model, variant, batch, rewrite_base=False)
        assert torch.equal(ARCH.outputs(model, batch), ref)
    assert 1e-4 < errors[torch.bfloat16] < 2e-2 and errors[torch.float32] < 1e-5, errors
