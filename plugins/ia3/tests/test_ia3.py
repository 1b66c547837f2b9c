"""ia3 and ia3_ff: the conformance kit on fp32, 4bit and 8bit bases, PEFT parity, config errors.

Tolerances: both gates start at exactly 1.0, so init is bit-exact (identity error 0); a fresh
base + the saved file runs the very same float ops as the trained model, so reload is exact too
(1e-6 allowed); PEFT runs the same elementwise product (fp32, 1e-5 allowed for op-order noise).
"""
import copy

import pytest
import torch

import lora_lite as ll
from lora_lite.testing import bf16_figures, check_variant, logits, make_batch, model_maker, perturb, tiny_llama

SETUPS = {  # variant -> (config kwargs, target layers on tiny_llama, trainable count)
    # tiny_llama: hidden 64, 4 heads, 2 kv heads (k/v out 32), intermediate 128, 2 layers
    "ia3": (dict(target_names=[r"k_proj$", r"v_proj$"]), ["k_proj", "v_proj"], 2 * (32 + 32)),
    "ia3_ff": (dict(target_names=[r"down_proj$"]), ["down_proj"], 2 * 128),
}


def make_model(base="fp32"):
    return model_maker(base)()


def randomize(model, seed=1):
    """Move every adapter tensor away from its init so that parity checks mean something."""
    perturb(model, std=0.3, seed=seed)


def peft_parity_error(variant, model_fn=lambda: tiny_llama(bias=True)):
    """max |logits(lora-lite) - logits(PEFT IA3)| with the same gate values (fp32)."""
    from peft import IA3Config, get_peft_model
    batch = make_batch()
    kwargs, names, _ = SETUPS[variant]
    base = model_fn()
    ours = copy.deepcopy(base)
    ll.attach(ours, ll.config(variant, **kwargs))
    randomize(ours)
    ff = names if variant == "ia3_ff" else []
    peft_model = get_peft_model(base, IA3Config(target_modules=names, feedforward_modules=ff))
    gates = ll.adapter_tensors(ours)
    copied = 0
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "ia3_l") and "default" in module.ia3_l:
                g = gates[name.removeprefix("base_model.model.") + ".lora_g"]
                module.ia3_l["default"].copy_(g.reshape(module.ia3_l["default"].shape))
                copied += 1
    assert copied == len(gates) > 0
    ours_out, peft_out = logits(ours, batch), logits(peft_model.eval(), batch)
    moved = (ours_out - logits(model_fn(), batch)).abs().max().item()
    return (ours_out - peft_out).abs().max().item(), moved


def test_discovered_through_entry_point():
    found = ll.variants()
    assert {"ia3", "ia3_ff"} <= set(found)
    from lora_lite.plugins import variant_origin
    assert variant_origin("ia3").distribution == variant_origin("ia3_ff").distribution == "lora-lite-ia3"
    assert ll.hook_kind(found["ia3"]) == "output" and ll.hook_kind(found["ia3_ff"]) == "input"


@pytest.mark.parametrize("base", ["fp32", "4bit", "8bit"])
@pytest.mark.parametrize("variant", ["ia3", "ia3_ff"])
def test_conformance(variant, base):
    kwargs, names, trainable = SETUPS[variant]
    m = check_variant(variant, ll.config(variant, **kwargs), bases=[base], lr=5e-2,
                      identity_tol=0.0, reload_tol=1e-6)["bases"][base]   # g = 1 exactly
    assert m["trainable"] == trainable and m["trained_delta"] > 1e-3
    expected_keys = sorted(f"model.layers.{i}.{'mlp' if n == 'down_proj' else 'self_attn'}.{n}.lora_g"
                           for i in range(2) for n in names)
    assert m["file_keys"] == expected_keys
    assert m["file_bytes"] < 4096 + 4 * trainable        # header + the gates, nothing else
    assert m["detach_logits_err"] == 0.0


@pytest.mark.parametrize("variant", ["ia3", "ia3_ff"])
def test_matches_peft(variant):
    pytest.importorskip("peft")
    err, moved = peft_parity_error(variant)
    assert moved > 1e-3          # the random gates really change the outputs (logits are ~1e-1)
    assert err < 1e-5


@pytest.mark.parametrize("base", ["4bit", "8bit"])
@pytest.mark.parametrize("variant", ["ia3", "ia3_ff"])
def test_quantized_math(variant, base):
    """On a quantized layer the gate acts on what that layer computes: layer(x)⊙g or layer(x⊙g)."""
    from lora_lite.layers.weights import guard_training
    model = make_model(base)
    kwargs, _, _ = SETUPS[variant]
    ll.attach(model, ll.config(variant, **kwargs))
    randomize(model)
    block = model.model.layers[0]
    layer = block.mlp.down_proj if variant == "ia3_ff" else block.self_attn.v_proj
    g = layer.lora_g.detach().clone()
    x = torch.randn(3, 5, layer.in_features)
    with torch.no_grad():
        got = layer(x)
        ll.detach(model)
        undo = guard_training(model)  # the same bnb kernel as while attached
        want = layer(x * g) if variant == "ia3_ff" else layer(x) * g
        plain = layer(x)
        undo()
    assert (got - want).abs().max().item() <= 1e-6
    assert (got - plain).abs().max().item() > 1e-2   # the random gate is not a no-op


@pytest.mark.parametrize("variant", ["ia3", "ia3_ff"])
def test_bf16(variant):
    kwargs, _, _ = SETUPS[variant]
    identity, grads_ok, moved = bf16_figures(variant, torch.bfloat16, **kwargs)
    assert identity == 0.0 and grads_ok and moved > 1e-3
    # bf16 gates on an fp32 model: the output gate multiplies in fp32 (exact); the input gate
    # gets its input already cast to cfg.dtype by core, so bf16 rounding of x shows (~2^-9)
    identity, grads_ok, moved = bf16_figures(variant, torch.float32, **kwargs)
    assert identity <= (0.0 if variant == "ia3" else 2e-3) and grads_ok and moved > 1e-4


def test_config_errors():
    with pytest.raises(ll.ConfigError, match="unknown config field"):
        ll.config("ia3", group_size=4)
    with pytest.raises(ll.ConfigError, match="dtype"):
        ll.config("ia3_ff", dtype="int8")
    with pytest.raises(ll.ConfigError, match="target_roles"):
        ll.config("ia3", target_roles=["everything"])
    with pytest.raises(ll.ConfigError, match="target_names"):
        ll.config("ia3_ff", target_names=["("])
    # r is unused by IA3: any value is accepted, nothing depends on it
    assert ll.config("ia3", r=0).r == 0
