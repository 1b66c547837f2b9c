"""LoRA: the invariants of design.md section 4 on fp32, 4bit and 8bit bases, and PEFT parity."""
import pytest
import torch

import lora_lite as ll
from lora_lite.testing import logits, make_batch, measure_invariants, quantize, tiny_llama

QV = dict(target_names=[r"q_proj$", r"v_proj$"], target_roles=())


def make(kind):
    return (lambda: tiny_llama()) if kind == "fp32" else (lambda: quantize(tiny_llama(), kind))


@pytest.mark.parametrize("kind", ["fp32", "4bit", "8bit"])
def test_invariants(kind):
    cfg = ll.config("lora", r=4, alpha=8, **QV)
    m = measure_invariants(make(kind), cfg, make_batch(), steps=3, lr=1e-2)
    assert m["identity_err"] == 0.0                    # B = 0: exact, on every base
    assert m["trainable"] == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))  # 2 layers x (q + v)
    assert m["grad_norm_first"] > 0 and m["zero_grad_adapters"] == 0
    assert m["base_grad_leaks"] == 0 and m["base_changed"] is False
    assert m["trained_delta"] > 1e-3                   # training moved the outputs
    assert m["reload_err"] < 1e-5
    assert all(".lora_A" in k or ".lora_B" in k for k in m["file_keys"]) and len(m["file_keys"]) == 8
    assert m["detach_bitexact"] and m["detach_logits_err"] == 0.0


def peft_twin(model, cfg):
    """The same base under PEFT's LoRA, with our adapter values copied in."""
    from peft import LoraConfig, get_peft_model
    twin = get_peft_model(tiny_llama(), LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                                   target_modules=["q_proj", "v_proj"]))
    modules = dict(twin.named_modules())
    for name, tensor in ll.adapter_tensors(model).items():
        layer, tname = name.rsplit(".", 1)
        peft_layer = modules["base_model.model." + layer]
        getattr(peft_layer, tname)["default"].weight.data.copy_(tensor)
    return twin.eval()


def test_matches_peft_given_the_same_adapter_values():
    model, batch = tiny_llama(), make_batch()
    cfg = ll.config("lora", r=4, alpha=8, **QV)
    ll.attach(model, cfg)
    with torch.no_grad():
        for name, t in ll.adapter_tensors(model).items():
            t.normal_(0, 0.2)
    twin = peft_twin(model, cfg)
    err = (logits(model, batch) - logits(twin, batch)).abs().max().item()
    assert err < 1e-5, err
    assert logits(model, batch).abs().max() > 0.1  # (the adapter is not a no-op)


def test_parameter_count_matches_shapes():
    # tiny_llama: hidden 64, 4 heads of 16, 2 kv heads -> q_proj 64->64, v_proj 64->32
    model = tiny_llama()
    ll.attach(model, ll.config("lora", r=4, **QV))
    q = model.model.layers[0].self_attn.q_proj
    v = model.model.layers[0].self_attn.v_proj
    assert (q.lora_A.shape, q.lora_B.shape) == ((4, 64), (64, 4))
    assert (v.lora_A.shape, v.lora_B.shape) == ((4, 64), (32, 4))
