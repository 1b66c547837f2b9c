"""DoRA's factored row norm (the default): no dense copy of W, adapter memory on a 4bit base
within 1.5× LoRA's, exact identity at init on every base, the norm equal to the dense one up to
the base kernel's own rounding on A's rows, and W never read in the forward. (PEFT parity of
this default, logits and gradients with a bias: test_dora.py.)"""
import warnings

import pytest
import torch
from lora_lite_dora.dora import row_norm

import lora_lite as ll
from lora_lite.testing import BASES, check_variant, logits, make_batch, model_maker, quantize, tiny_llama, train_steps

warnings.filterwarnings("ignore", message="MatMul8bitLt")

TARGETS = [r"q_proj$", r"v_proj$"]


MAKERS = {f"{base}+bias": model_maker(base, bias=True) for base in BASES}


def cfg_of(variant="dora", **kw):
    return ll.config(variant, **{"r": 4, "alpha": 8, "target_names": TARGETS, **kw})


def adapter_bytes(model):
    """Bytes of every adapter tensor on the targets (parameters and buffers, saved or not)."""
    total = 0
    for t in ll.attached(model).targets:
        for name, tensor in list(t.layer.named_parameters(recurse=False)) + \
                list(t.layer.named_buffers(recurse=False)):
            if name.startswith("lora_"):
                total += tensor.numel() * tensor.element_size()
    return total


def test_default_is_factored_and_refuses_a_cache():
    assert cfg_of().factored_norm is True and cfg_of().cache_weight is False
    with pytest.raises(ll.ConfigError, match="cache_weight"):
        cfg_of(cache_weight=True)
    with pytest.raises(ll.ConfigError, match="factored_norm"):
        cfg_of(factored_norm="yes")


@pytest.mark.parametrize("kind", ["fp32", "4bit", "8bit"])
def test_conformance_exact_identity(kind):
    """The kit with biased projections; on fp32 also PEFT parity (use_dora) and merge."""
    out = check_variant("dora", cfg_of(), bases=[kind], bias=True, identity_tol=0.0,
                        reload_tol=0.0, peft=kind == "fp32", merge=kind == "fp32")
    m = out["bases"][kind]
    assert m["identity_err"] == 0.0          # B = 0: both factored terms are exactly 0
    assert {k.rsplit(".", 1)[1] for k in m["file_keys"]} == {"lora_A", "lora_B", "lora_m"}
    if kind == "fp32":
        assert out["peft_parity"] < 1e-5 and out["merge_err"] < 1e-5


def test_adapter_memory_on_4bit_within_1_5x_lora():
    sizes = {}
    for name, cfg in [("lora", cfg_of("lora")), ("factored", cfg_of()),
                      ("cached", cfg_of(factored_norm=False, cache_weight=True))]:
        model = quantize(tiny_llama(), "4bit")
        ll.attach(model, cfg)
        sizes[name] = adapter_bytes(model)
    assert sizes["factored"] <= 1.5 * sizes["lora"]
    assert sizes["cached"] > 4 * sizes["lora"]        # the dense copy the factored norm avoids


@pytest.mark.parametrize("kind", list(MAKERS))
def test_factored_norm_equals_dense_norm(kind):
    """‖W + s·B A‖_row from factors vs from the dense W: equal up to the base kernel's error on
    A's rows (fp32 and 4bit: fp32 rounding; 8bit: int8 activations, bounded here)."""
    model = MAKERS[kind]()
    ll.attach(model, cfg_of())
    train_steps(model)
    for t in ll.attached(model).targets:
        layer, s = t.layer, t.layer._lora_cfg.scale
        with torch.no_grad():
            W = ll.dense_weight(layer)
            want = (W + s * layer.lora_B @ layer.lora_A).norm(dim=1)
            got = row_norm(layer, layer._lora_cfg, like=torch.zeros(1))
            kernel_err = (layer.forward(layer.lora_A) - (layer.lora_A @ W.T + layer.bias)).abs()
            bound = 2 * s * (layer.lora_B.abs() * kernel_err.T).sum(dim=1)     # on ‖·‖²
        assert layer.lora_B.abs().max() > 1e-3                                   # trained
        assert ((got ** 2 - want ** 2).abs() <= 1.01 * bound + 1e-5 * want ** 2).all()


def test_dense_weight_never_read_in_forward(monkeypatch):
    model = MAKERS["4bit+bias"]()
    ll.attach(model, cfg_of())
    before = logits(model, make_batch())

    def no_dequantization(layer):
        raise AssertionError("dense weight read in the forward")
    monkeypatch.setattr(ll, "dense_weight", no_dequantization)
    train_steps(model, steps=2)
    assert not torch.equal(logits(model, make_batch()), before)

