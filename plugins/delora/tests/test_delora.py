"""DeLoRA plugin: invariants (fp32, 4bit, 8bit), PEFT parity, base norms on quantized layers,
the fp16 overflow trap, config validation."""
import copy

import pytest
import torch

import lora_lite as ll
from lora_lite.testing import (
    BASES,
    backward_lm,
    check_variant,
    logits,
    make_batch,
    model_maker,
    peft_layer_pairs,
    tiny_llama,
)

TARGETS = [r"q_proj$", r"v_proj$"]
# tiny_llama: q_proj 64->64, v_proj 64->32, two layers; per target r(d_in+d_out) + 1 (λ)
TRAINABLE = 2 * ((4 * (64 + 64) + 1) + (4 * (64 + 32) + 1))
MAKERS = {base: model_maker(base) for base in BASES}


def make_cfg(**kw):
    return ll.config("delora", **{"r": 4, "target_names": TARGETS, "target_roles": (), **kw})


def invariants(kind):
    return check_variant("delora", make_cfg(), bases=[kind], identity_tol=0.0,
                         reload_tol=1e-6)["bases"][kind]


def perturb(model, seed=1, lam=2.5):
    """Give every adapter a non-zero B and a non-default λ, so that parity is not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in ll.adapter_tensors(model).items():
            if name.endswith("lora_B"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif name.endswith("lora_lambda"):
                t.fill_(lam)


def peft_pair(lambda0=15.0):
    """(lora-lite model, PEFT DeLoRA model) on copies of one base, same A, B, λ values."""
    from peft import DeloraConfig, get_peft_model
    base = tiny_llama()
    ours = copy.deepcopy(base)
    ll.attach(ours, make_cfg(lambda0=lambda0))
    perturb(ours)
    theirs = get_peft_model(copy.deepcopy(base), DeloraConfig(
        r=4, delora_lambda=lambda0, target_modules=["q_proj", "v_proj"]))
    norm_err = 0.0
    with torch.no_grad():
        for module, layer in peft_layer_pairs(theirs, ours, "delora_A"):
            module.delora_A["default"].copy_(layer.lora_A)
            module.delora_B["default"].copy_(layer.lora_B)
            module.delora_lambda["default"].copy_(layer.lora_lambda.reshape(1))
            norm_err = max(norm_err, (module.delora_w_norm["default"] - layer.lora_wnorm).abs().max().item())
    return base, ours, theirs, norm_err


def test_registered_through_entry_point():
    v = ll.variants()["delora"]
    assert v.config.__name__ == "DeLoRAConfig" and v.config.knobs() == {"lambda0": 15.0}
    assert v.paper.endswith("2503.18225")


@pytest.mark.parametrize("kind", ["fp32", "4bit", "8bit"])
def test_invariants(kind):
    out = invariants(kind)
    # B = 0 makes the added term exactly zero, so y + 0 == y: identity is exact on every base
    assert out["identity_err"] == 0.0
    assert out["trainable"] == TRAINABLE
    assert out["trained_delta"] > 1e-3
    assert out["reload_err"] <= 1e-6  # same base + stored A, B, λ; w recomputed from the base
    names = {k.rsplit(".", 1)[1] for k in out["file_keys"]}
    assert names == {"lora_A", "lora_B", "lora_lambda"}  # no base weights, no derived norms
    assert len(out["file_keys"]) == 3 * 4
    assert out["detach_logits_err"] == 0.0


@pytest.mark.parametrize("kind,tol", [("4bit", 0.08), ("8bit", 0.006)])
def test_norms_read_from_dequantized_weight(kind, tol):
    ref = tiny_llama()
    model = MAKERS[kind]()
    ll.attach(model, make_cfg())
    for t in ll.attached(model).targets:
        dense = ll.dense_weight(t.layer)
        assert torch.equal(t.layer.lora_wnorm, dense.norm(dim=0))
        true = ref.get_submodule(t.name).weight.norm(dim=0)
        rel = ((t.layer.lora_wnorm - true).abs() / true).max().item()
        assert rel < tol  # only the quantizer's error; measured 0.057 (nf4), 0.0036 (int8)
        raw = t.layer.weight  # what upstream normed: packed nf4 bytes / unscaled int8 codes
        if raw.shape == dense.shape:
            assert ((raw.float().norm(dim=0) - true).abs() / true).max() > 10
        else:
            assert tuple(raw.shape) != (t.d_out, t.d_in)


def test_peft_parity():
    base, ours, theirs, norm_err = peft_pair()
    assert norm_err == 0.0  # same column norms as PEFT reads from the fp32 weight
    batch = make_batch()
    a, b, ref = logits(ours, batch), logits(theirs, batch), logits(base, batch)
    assert (a - ref).abs().max() > 1e-2  # the adapters do something, parity is not trivial
    assert (a - b).abs().max() < 1e-5  # fp32 rounding only (normalise-first order); measured 1.2e-7


def test_peft_parity_gradients():
    _, ours, theirs, _ = peft_pair()
    backward_lm(ours, theirs, batch=make_batch())
    for module, layer in peft_layer_pairs(theirs, ours, "delora_A"):
        for mine, peft_t in [(layer.lora_A, module.delora_A["default"]),
                             (layer.lora_B, module.delora_B["default"]),
                             (layer.lora_lambda, module.delora_lambda["default"])]:
            scale = peft_t.grad.abs().max().item()
            assert scale > 0
            assert (mine.grad.reshape(peft_t.shape) - peft_t.grad).abs().max().item() <= 1e-4 * scale


def test_fp16_has_no_overflow_at_init():
    # PEFT's form scales by λ/(r·‖aᵢ‖·max(‖bᵢ‖,1e-4)); with B = 0 that is ≈ λ·1e4/(r‖aᵢ‖),
    # beyond fp16's 65504 for λ = 100, and inf · 0 = NaN. Normalising first avoids it.
    model = tiny_llama()
    batch = make_batch()
    ref = logits(model, batch)
    ll.attach(model, make_cfg(lambda0=100.0, dtype=torch.float16))
    layer = ll.attached(model).targets[0].layer
    a_norm = layer.lora_A.norm(dim=1)
    peft_scale = (layer.lora_lambda / 4) / (a_norm * layer.lora_B.norm(dim=0).clamp_min(1e-4))
    assert not torch.isfinite(peft_scale).all()  # the trap is real at this λ in fp16
    out = logits(model, batch)
    assert torch.isfinite(out).all() and torch.equal(out, ref)
    params = ll.trainable_parameters(model)
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in params)
    torch.optim.SGD(params, lr=1e-3).step()
    assert torch.isfinite(logits(model, batch)).all()


@pytest.mark.parametrize("value", [0, 0.0, -1.0, float("nan"), float("inf"), "15", True, None])
def test_bad_lambda0_names_the_field(value):
    with pytest.raises(ll.ConfigError, match="lambda0"):
        make_cfg(lambda0=value)


def test_bad_common_fields_name_the_field():
    with pytest.raises(ll.ConfigError, match="^r:"):
        make_cfg(r=0)
    with pytest.raises(ll.ConfigError, match="lambda"):
        ll.config("delora", lambda_0=1.0)  # typo: unknown field, the known ones are listed


def test_config_round_trips_through_json():
    cfg = make_cfg(lambda0=0.5)
    back = ll.AdapterConfig.from_json(cfg.to_json())
    assert back == cfg and type(back) is type(cfg)
