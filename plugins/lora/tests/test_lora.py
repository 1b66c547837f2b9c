"""LoRA: the conformance kit on fp32, 4bit and 8bit bases, PEFT parity, tensor shapes."""
import pytest

import lora_lite as ll
from lora_lite.testing import check_variant, logits, make_batch, perturb, tiny_llama

QV = dict(target_names=[r"q_proj$", r"v_proj$"], target_roles=())


@pytest.mark.parametrize("base", ["fp32", "4bit", "8bit"])
def test_conformance(base):
    figures = check_variant("lora", ll.config("lora", r=4, alpha=8, **QV), bases=[base],
                            identity_tol=0.0)                 # B = 0: exact, on every base
    m = figures["bases"][base]
    assert m["trainable"] == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))  # 2 layers x (q + v)
    assert m["trained_delta"] > 1e-3 and m["reload_err"] < 1e-5
    assert all(".lora_A" in k or ".lora_B" in k for k in m["file_keys"]) and len(m["file_keys"]) == 8
    assert m["detach_logits_err"] == 0.0


def test_matches_peft_given_the_same_adapter_values():
    from peft import LoraConfig, get_peft_model
    model, batch = tiny_llama(), make_batch()
    cfg = ll.config("lora", r=4, alpha=8, **QV)
    ll.attach(model, cfg)
    perturb(model, std=0.2, replace=True)
    twin = get_peft_model(tiny_llama(), LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                                   target_modules=["q_proj", "v_proj"]))
    modules = dict(twin.named_modules())
    for name, tensor in ll.adapter_tensors(model).items():
        layer, tname = name.rsplit(".", 1)
        getattr(modules["base_model.model." + layer], tname)["default"].weight.data.copy_(tensor)
    err = (logits(model, batch) - logits(twin.eval(), batch)).abs().max().item()
    assert err < 1e-5, err
    assert (logits(model, batch) - logits(tiny_llama(), batch)).abs().max() > 0.1  # not a no-op


def test_parameter_count_matches_shapes():
    # tiny_llama: hidden 64, 4 heads of 16, 2 kv heads -> q_proj 64->64, v_proj 64->32
    model = tiny_llama()
    ll.attach(model, ll.config("lora", r=4, **QV))
    q = model.model.layers[0].self_attn.q_proj
    v = model.model.layers[0].self_attn.v_proj
    assert (q.lora_A.shape, q.lora_B.shape) == ((4, 64), (64, 4))
    assert (v.lora_A.shape, v.lora_B.shape) == ((4, 64), (32, 4))
