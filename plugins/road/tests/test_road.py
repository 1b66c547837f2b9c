"""road (road_1, road_2, road_4): the conformance kit on fp32, 4bit and 8bit bases, PEFT
parity for all three layouts, the explicit rotation matrix on quantized layers, config errors.

Tolerances: θ = 0, α = 1 give c = 1, s = 0 exactly, so identity is bit-exact (0); reload runs
the same ops on the same values (1e-6); PEFT computes the same elementwise products (1e-5).
"""
import copy

import pytest
import torch

import lora_lite as ll
from lora_lite.layers.weights import guard_training
from lora_lite.testing import bf16_figures, check_variant, logits, make_batch, model_maker, perturb, tiny_llama

VARIANTS = ["road_1", "road_2", "road_4"]
TARGETS = ["q_proj", "v_proj"]
GROUP = 8  # tiny_llama's v_proj has d_out 32, q_proj 64; PEFT's default 64 does not divide 32
# trainable: (θ, α) × 2 layers × (q 64 + v 32 outputs) × values per output (½, 1, 2)
TRAINABLE = {"road_1": 2 * 2 * 96 // 2, "road_2": 2 * 2 * 96, "road_4": 2 * 2 * 96 * 2}


def kwargs(road_variant):
    return dict(road_variant=road_variant, group_size=GROUP, target_names=[r"q_proj$", r"v_proj$"])


def make_model(base="fp32"):
    return model_maker(base)()


def randomize(model, seed=1):
    """θ ~ N(0, 0.5), α ~ N(1, 0.5): far from the identity, every layout slot different."""
    perturb(model, std=0.5, seed=seed)


def explicit_rotation(layer):
    """The (d_out, d_out) matrix M with y' = y Mᵀ, built pair by pair from the paper's formula."""
    from lora_lite_road.road import coefficients
    cfg = layer._lora_cfg
    c, s = coefficients(layer.lora_road_theta.detach(), layer.lora_road_alpha.detach(),
                        cfg.road_variant, cfg.group_size)
    d, g = c.numel(), cfg.group_size
    M = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, d, g):
        for j in range(g // 2):
            a, b = start + j, start + j + g // 2
            M[a, a], M[a, b] = c[a], -s[a]      # y'_a = c_a y_a − s_a y_b
            M[b, b], M[b, a] = c[b], s[b]       # y'_b = c_b y_b + s_b y_a
    return M


def peft_parity_error(road_variant, model_fn=lambda: tiny_llama(bias=True)):
    """max |logits(lora-lite) - logits(PEFT RoAd)| with the same θ and α (fp32)."""
    from peft import RoadConfig, get_peft_model
    batch = make_batch()
    base = model_fn()
    ours = copy.deepcopy(base)
    ll.attach(ours, ll.config("road", **kwargs(road_variant)))
    randomize(ours)
    peft_model = get_peft_model(base, RoadConfig(variant=road_variant, group_size=GROUP,
                                                 target_modules=TARGETS))
    tensors = ll.adapter_tensors(ours)
    copied = 0
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "road_theta") and "default" in module.road_theta:
                ours_name = name.removeprefix("base_model.model.")
                module.road_theta["default"].copy_(tensors[ours_name + ".lora_road_theta"])
                module.road_alpha["default"].copy_(tensors[ours_name + ".lora_road_alpha"])
                copied += 1
    assert copied == len(tensors) // 2 > 0
    ours_out, peft_out = logits(ours, batch), logits(peft_model.eval(), batch)
    moved = (ours_out - logits(model_fn(), batch)).abs().max().item()
    return (ours_out - peft_out).abs().max().item(), moved


def rotation_reference_error(road_variant, base):
    """One hooked (quantized) v_proj with random θ, α against base_layer(x) Mᵀ, M explicit."""
    model = make_model(base)
    ll.attach(model, ll.config("road", **kwargs(road_variant)))
    randomize(model)
    layer = model.model.layers[0].self_attn.v_proj
    M = explicit_rotation(layer)
    x = torch.randn(2, 6, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = layer(x)
        ll.detach(model)
        undo = guard_training(model)  # the same bnb kernel as while attached
        y = layer(x)
        undo()
    want = (y.double() @ M.T).float()
    return (got - want).abs().max().item(), (got - y).abs().max().item()


def test_discovered_through_entry_point():
    assert "road" in ll.variants()
    from lora_lite.plugins import variant_origin
    assert variant_origin("road").distribution == "lora-lite-road"
    assert ll.hook_kind(ll.variants()["road"]) == "output"


@pytest.mark.parametrize("base", ["fp32", "4bit", "8bit"])
@pytest.mark.parametrize("road_variant", VARIANTS)
def test_conformance(road_variant, base):
    m = check_variant("road", ll.config("road", **kwargs(road_variant)), bases=[base], lr=5e-2,
                      identity_tol=0.0, reload_tol=1e-6)["bases"][base]
    assert m["trainable"] == TRAINABLE[road_variant] and m["trained_delta"] > 1e-3
    assert m["file_keys"] == sorted(f"model.layers.{i}.self_attn.{n}.lora_road_{p}"
                                    for i in range(2) for n in TARGETS for p in ("alpha", "theta"))
    assert m["file_bytes"] < 4096 + 4 * TRAINABLE[road_variant]
    assert m["detach_logits_err"] == 0.0


@pytest.mark.parametrize("road_variant", VARIANTS)
def test_matches_peft(road_variant):
    pytest.importorskip("peft")
    err, moved = peft_parity_error(road_variant)
    assert moved > 1e-2
    assert err < 1e-5


@pytest.mark.parametrize("base", ["fp32", "4bit", "8bit"])
@pytest.mark.parametrize("road_variant", VARIANTS)
def test_matches_explicit_rotation(road_variant, base):
    err, moved = rotation_reference_error(road_variant, base)
    assert moved > 1e-2
    assert err < 1e-5


def test_parameter_sizes_follow_the_variant():
    specs = {v: ll.variants()["road"].param_specs(16, 32, ll.config("road", road_variant=v, group_size=8))
             for v in VARIANTS}
    assert {v: s["lora_road_theta"].shape for v, s in specs.items()} == \
        {"road_1": (16,), "road_2": (32,), "road_4": (64,)}


@pytest.mark.parametrize("road_variant", VARIANTS)
def test_bf16(road_variant):
    for model_dtype in (torch.bfloat16, torch.float32):   # cos 0 = 1, sin 0 = 0 in any dtype
        identity, grads_ok, moved = bf16_figures("road", model_dtype, **kwargs(road_variant))
        assert identity == 0.0 and grads_ok and moved > 1e-3


def test_config_errors():
    with pytest.raises(ll.ConfigError, match=r"^road_variant: "):
        ll.config("road", road_variant="road_3")
    for bad in (0, -8, 7, 8.0, True):
        with pytest.raises(ll.ConfigError, match=r"^group_size: "):
            ll.config("road", group_size=bad)
    # group_size must divide every target's d_out: checked at attach, the model left untouched
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.ConfigError, match=r"^group_size: got 64.*d_out = 32"):
        ll.attach(model, ll.config("road", target_names=[r"v_proj$"]))   # PEFT's default 64
    assert ll.attached(model) is None
    assert not any(hasattr(m, "lora_road_theta") for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert ll.config("road", r=0, group_size=2).group_size == 2   # r is unused by RoAd
