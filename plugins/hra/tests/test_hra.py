"""hra: the conformance kit on fp32, 4bit and 8bit bases, PEFT parity, an explicit dense
reference on quantized layers (where PEFT's HRA is wrong), no d_in × d_in matrix, config errors.

Tolerances: the paired init cancels in exact arithmetic only (the Gram entry v·v of a unit row
is 1 ± 1 ulp), so identity is within 1e-5 on logits in fp32 (~1e-7 relative on each hooked
input); LLM.int8 re-quantizes each hooked input row, where that ulp can flip one int8 rounding,
hence 1e-4 on 8bit. Reload runs the same float ops on the same values: 1e-6. PEFT builds
W·R explicitly, a different summation order: 1e-5.
"""
import copy
import math

import pytest
import torch

import lora_lite as ll
from lora_lite.layers.weights import guard_training
from lora_lite.testing import bf16_figures, check_variant, logits, make_batch, model_maker, perturb, tiny_llama

KWARGS = dict(r=4, target_names=[r"q_proj$", r"v_proj$"])
TARGETS = ["q_proj", "v_proj"]
TRAINABLE = 2 * 2 * 4 * 64  # 2 layers × (q, v) × r × d_in
IDENTITY_TOL = {"fp32": 1e-5, "4bit": 1e-5, "8bit": 1e-4}


def make_model(base="fp32"):
    return model_maker(base)()


def randomize(model, seed=1):
    """Fresh random Householder vectors (no longer paired), so the adapter is far from identity."""
    perturb(model, std=1.0, seed=seed, replace=True)


def explicit_R(U):
    """PEFT's R = H_0 H_1 ⋯ H_{r-1} as a dense (d_in, d_in) float64 matrix (for reference only)."""
    U = U.detach().double()
    R = torch.eye(U.shape[1], dtype=torch.float64)
    for u in U:
        v = (u / u.norm()).unsqueeze(1)
        R = R - 2 * (R @ v) @ v.T
    return R


def peft_parity_error(model_fn=lambda: tiny_llama(bias=True)):
    """max |logits(lora-lite) - logits(PEFT HRA)| with the same Householder vectors (fp32)."""
    from peft import HRAConfig, get_peft_model
    batch = make_batch()
    base = model_fn()
    ours = copy.deepcopy(base)
    ll.attach(ours, ll.config("hra", **KWARGS))
    randomize(ours)
    peft_model = get_peft_model(base, HRAConfig(r=KWARGS["r"], target_modules=TARGETS))
    vectors = ll.adapter_tensors(ours)
    copied = 0
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "hra_u") and "default" in module.hra_u:
                U = vectors[name.removeprefix("base_model.model.") + ".lora_U"]   # (r, d_in)
                module.hra_u["default"].copy_(U.T)                                # (d_in, r)
                copied += 1
    assert copied == len(vectors) > 0
    ours_out, peft_out = logits(ours, batch), logits(peft_model.eval(), batch)
    moved = (ours_out - logits(model_fn(), batch)).abs().max().item()
    return (ours_out - peft_out).abs().max().item(), moved


def quantized_reference_errors(base, seed=0):
    """On one quantized q_proj with random U: max error of the hooked layer against
    (a) the same quantized layer fed x Rᵀ with R explicit (same kernel: checks the math), and
    (b) the dense dequantized weight, F.linear(x Rᵀ, dense_weight) (kernel noise included), and
    the error of the wrong reflection order (Rᵀ), which the check must be able to tell apart."""
    model = make_model(base)
    ll.attach(model, ll.config("hra", **KWARGS))
    randomize(model, seed=seed + 1)
    layer = model.model.layers[0].self_attn.q_proj
    R = explicit_R(layer.lora_U)
    x = torch.randn(2, 6, layer.in_features, generator=torch.Generator().manual_seed(seed))
    xR = (x.double() @ R.T).float()
    xR_wrong = (x.double() @ R).float()
    with torch.no_grad():
        got = layer(x)
        dense = torch.nn.functional.linear(xR, ll.dense_weight(layer), layer.bias)
        ll.detach(model)
        undo = guard_training(model)
        same_kernel, wrong_order = layer(xR), layer(xR_wrong)
        undo()

    def err(a):
        return (got - a).abs().max().item()
    return err(same_kernel), err(dense), err(wrong_order), got.abs().max().item()


def test_discovered_through_entry_point():
    from lora_lite.plugins import variant_origin
    assert variant_origin("hra").distribution == "lora-lite-hra"
    assert ll.hook_kind(ll.variants()["hra"]) == "input"


@pytest.mark.parametrize("base", ["fp32", "4bit", "8bit"])
def test_conformance(base):
    m = check_variant("hra", ll.config("hra", **KWARGS), bases=[base],
                      identity_tol=IDENTITY_TOL[base], reload_tol=1e-6)["bases"][base]
    assert m["trainable"] == TRAINABLE and m["trained_delta"] > 1e-3
    assert m["file_keys"] == sorted(f"model.layers.{i}.self_attn.{n}.lora_U"
                                    for i in range(2) for n in TARGETS)
    assert m["file_bytes"] < 4096 + 4 * TRAINABLE
    assert m["detach_logits_err"] == 0.0


def test_symmetric_init_pairs_rows():
    model = make_model()
    ll.attach(model, ll.config("hra", r=6, target_names=[r"q_proj$"]))
    U = model.model.layers[0].self_attn.q_proj.lora_U
    assert U.shape == (6, 64)
    assert torch.equal(U[0::2], U[1::2]) and not torch.equal(U[0], U[2])
    bound = 1 / math.sqrt(6 // 2)  # PEFT: kaiming-uniform(a=√5) on (d_in, r/2), fan_in = r/2
    assert U.abs().max() <= bound and U.abs().max() > bound / 2


def test_init_is_peft_init_for_the_same_seed():
    """Same seed, same draws: lora_U is PEFT's hra_u (transposed) bit for bit, on every target."""
    pytest.importorskip("peft")
    from peft import HRAConfig, get_peft_model
    ours = tiny_llama()
    ll.attach(ours, ll.config("hra", seed=0, **KWARGS))
    base = tiny_llama()
    torch.manual_seed(0)   # PEFT draws from the global generator
    peft_model = get_peft_model(base, HRAConfig(r=KWARGS["r"], target_modules=TARGETS))
    vectors = ll.adapter_tensors(ours)
    compared = 0
    for name, module in peft_model.named_modules():
        if hasattr(module, "hra_u") and "default" in module.hra_u:
            U = vectors[name.removeprefix("base_model.model.") + ".lora_U"]
            assert torch.equal(module.hra_u["default"].T, U), name
            compared += 1
    assert compared == len(vectors) == 4


def test_matches_peft():
    pytest.importorskip("peft")
    err, moved = peft_parity_error()
    assert moved > 1e-2           # random reflections really change the outputs
    assert err < 1e-5


@pytest.mark.parametrize("base", ["fp32", "4bit", "8bit"])
def test_matches_explicit_dense_reference(base):
    same_kernel, dense, wrong_order, scale = quantized_reference_errors(base)
    assert same_kernel <= 1e-5 * scale
    # the dense dequantized weight differs from bnb's kernel only by its own rounding
    assert dense <= {"fp32": 1e-5, "4bit": 1e-4, "8bit": 5e-2}[base] * scale
    assert wrong_order > 1e-1 * scale    # the reference can tell the reflection order apart


def test_never_builds_a_d_in_square_matrix():
    """Record every tensor produced during forward + backward of one hooked layer (d_in 512,
    8 tokens): none is anywhere near d_in × d_in."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    d_in, d_out = 512, 64
    model = torch.nn.Sequential(torch.nn.Linear(d_in, d_out))
    ll.attach(model, ll.config("hra", r=8, target_roles=()))
    x = torch.randn(8, d_in, requires_grad=True)
    with Largest():
        model(x).square().sum().backward()
    assert model[0].lora_U.grad is not None and model[0].lora_U.grad.abs().sum() > 0
    assert Largest.numel <= d_in * d_out  # the base weight's size; d_in² would be 8× more


def test_bf16():
    identity, grads_ok, moved = bf16_figures("hra", torch.bfloat16, **KWARGS)
    assert identity <= 4e-3 and grads_ok and moved > 1e-3   # ≤ 2 bf16 ulps of logits ~0.5
    # on an fp32 model core casts the input to bf16 first: bf16 rounding of x (~2^-9) shows
    identity, grads_ok, moved = bf16_figures("hra", torch.float32, **KWARGS)
    assert identity <= 5e-3 and grads_ok and moved > 1e-3


def test_config_errors():
    for bad in (3, 5, 7):
        with pytest.raises(ll.ConfigError, match=r"^r: .*even"):
            ll.config("hra", r=bad)
    for bad in (0, -2, 2.0, "4", True):
        with pytest.raises(ll.ConfigError, match=r"^r: "):
            ll.config("hra", r=bad)
    with pytest.raises(ll.ConfigError, match="unknown config field"):
        ll.config("hra", apply_GS=True)
    assert ll.config("hra", r=2).r == 2
