"""DoRA plugin: invariants (fp32, 4bit, 8bit; cached and uncached dense weight), PEFT parity
(use_dora=True: magnitude init, logits, gradients, with a bias), the bias passing unscaled, the
weight cache (unsaved, not re-read, safe on 8bit layers), config validation."""
import copy
import warnings

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
    train_steps,
)

warnings.filterwarnings("ignore", message="MatMul8bitLt")

TARGETS = [r"q_proj$", r"v_proj$"]
# tiny_llama: q_proj 64->64, v_proj 64->32, two layers; per target r(d_in + d_out) + d_out (m)
TRAINABLE = 2 * ((4 * (64 + 64) + 64) + (4 * (64 + 32) + 32))


MAKERS = {
    **{base: model_maker(base) for base in BASES},
    **{f"{base}+bias": model_maker(base, bias=True) for base in BASES},
}


def make_cfg(**kw):
    return ll.config("dora", **{"r": 4, "alpha": 8, "target_names": TARGETS, **kw})


def invariants(kind, **kw):
    return check_variant("dora", make_cfg(**kw), bases=[kind], identity_tol=0.0,
                         reload_tol=0.0)["bases"][kind]


def peft_pair(kind="fp32+bias"):
    """(base, ours trained, PEFT use_dora model holding our trained A, B, m). Returns also the
    max difference between PEFT's magnitude init and ours."""
    from peft import LoraConfig, get_peft_model
    base = MAKERS[kind]()
    ours = copy.deepcopy(base)
    ll.attach(ours, make_cfg())
    m_init = {name: t.detach().clone() for name, t in ll.adapter_tensors(ours).items()}
    train_steps(ours)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, use_dora=True))
    m_err = 0.0
    with torch.no_grad():
        for module, layer in peft_layer_pairs(theirs, ours):
            magnitude = module.lora_magnitude_vector["default"].weight
            m_err = max(m_err, (magnitude - m_init[f"{layer._lora_name}.lora_m"]).abs().max().item())
            module.lora_A["default"].weight.copy_(layer.lora_A)
            module.lora_B["default"].weight.copy_(layer.lora_B)
            magnitude.copy_(layer.lora_m)
    return base, ours, theirs, m_err


def test_registered_through_entry_point():
    v = ll.variants()["dora"]
    assert v.config.__name__ == "DoRAConfig"
    assert v.config.knobs() == {"factored_norm": True, "cache_weight": False, "use_rslora": False}
    assert v.paper.endswith("2402.09353") and not v.rewrites_weight


@pytest.mark.parametrize("kind,cache", [("fp32", True), ("4bit", True), ("8bit", True),
                                        ("4bit", False), ("8bit", False)])
def test_invariants(kind, cache):
    out = invariants(kind, factored_norm=False, cache_weight=cache)  # the factored default: test_dora_factored.py
    # m is computed by the same function as the forward's norm, so g = m/n is exactly 1 and
    # B = 0: the added term (g − 1)(y − b) + g·s·x Aᵀ Bᵀ is exactly 0 on every base
    assert out["identity_err"] == 0.0
    assert out["trainable"] == TRAINABLE
    assert out["trained_delta"] > 1e-3
    assert out["reload_err"] == 0.0  # stored A, B, m; the cache is rebuilt from the fresh base
    assert {k.rsplit(".", 1)[1] for k in out["file_keys"]} == {"lora_A", "lora_B", "lora_m"}
    assert len(out["file_keys"]) == 3 * 4  # no lora_weight_cache, no base weight
    assert out["file_bytes"] < TRAINABLE * 4 + 4096
    assert out["detach_logits_err"] == 0.0


def test_peft_magnitude_init_is_the_same():
    *_, m_err = peft_pair()
    assert m_err < 1e-6  # the row norms of W; measured 0.0


def test_peft_parity_after_training():
    base, ours, theirs, _ = peft_pair()
    batch = make_batch()
    a, b = logits(ours, batch), logits(theirs, batch)
    assert (a - logits(base, batch)).abs().max() > 1e-2  # trained: parity is not trivial
    assert (a - b).abs().max() < 1e-5  # fp32 rounding only; measured ~1e-7


def test_peft_parity_gradients():
    _, ours, theirs, _ = peft_pair()
    backward_lm(ours, theirs, batch=make_batch())
    for module, layer in peft_layer_pairs(theirs, ours):
        for mine, peft_t in [(layer.lora_A, module.lora_A["default"].weight),
                             (layer.lora_B, module.lora_B["default"].weight),
                             (layer.lora_m, module.lora_magnitude_vector["default"].weight)]:
            scale = peft_t.grad.abs().max().item()
            assert scale > 0
            assert (mine.grad - peft_t.grad).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize("kind", ["fp32+bias", "4bit+bias", "8bit+bias"])
def test_formula_and_unscaled_bias(kind):
    model = MAKERS[kind]()
    ll.attach(model, make_cfg(factored_norm=False))  # the dense norm; factored: test_dora_factored.py
    train_steps(model)
    layer = ll.attached(model).targets[0].layer
    x = torch.randn(5, layer.in_features)
    with torch.no_grad():
        got = layer(x)
        base = layer.forward(x)                       # the layer's own kernel, without the hook
        W = ll.dense_weight(layer)
        V = W + layer._lora_cfg.scale * layer.lora_B @ layer.lora_A
        g = layer.lora_m / V.norm(dim=1)
        want = g * (x @ V.T) + layer.bias             # the bias is not scaled by g
    assert (g - 1).abs().max() > 1e-3 and layer.bias.abs().max() > 1e-2
    # the base term comes from the layer's kernel (int8 activations on 8bit), not from x Wᵀ
    kernel_err = (base - (x @ W.T + layer.bias)).abs()                  # (5, d_out)
    assert ((got - want).abs() <= 1e-5 + 1.01 * g.abs() * kernel_err).all()


def test_cached_weight_is_not_reread(monkeypatch):
    model = MAKERS["4bit"]()
    ll.attach(model, make_cfg(factored_norm=False, cache_weight=True))
    for t in ll.attached(model).targets:
        assert torch.equal(t.layer.lora_weight_cache, ll.dense_weight(t.layer))
        assert "lora_weight_cache" not in t.layer.state_dict()
    batch = make_batch()
    before = logits(model, batch)

    def no_dequantization(layer):
        raise AssertionError("dense weight re-read in the forward")
    monkeypatch.setattr(ll, "dense_weight", no_dequantization)
    train_steps(model, steps=1)
    assert not torch.equal(logits(model, batch), before)


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_uncached_equals_cached(kind):
    batch = make_batch()
    out = {}
    for cache in (True, False):
        model = MAKERS[kind]()
        logits(model, batch)  # run the quantized layers first (8bit moves its scales on forward)
        ll.attach(model, make_cfg(factored_norm=False, cache_weight=cache))
        train_steps(model)          # every forward of the uncached adapter re-reads the weight
        out[cache] = [logits(model, batch) for _ in range(2)]
    assert torch.equal(out[False][0], out[False][1])  # the layers still work after the reads
    assert torch.equal(out[True][0], out[False][0])


def test_config_validation():
    for field, value in [("cache_weight", "yes"), ("cache_weight", 1), ("r", 0),
                         ("alpha", "big"), ("target_roles", ("middle",))]:
        with pytest.raises(ll.ConfigError, match=field):
            make_cfg(**{field: value})
