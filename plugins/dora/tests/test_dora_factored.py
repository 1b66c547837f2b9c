"""DoRA's factored row norm (the default): no dense copy of W, adapter memory on a 4bit base
within 1.5× LoRA's, exact identity at init on every base, the norm equal to the dense one up to
the base kernel's own rounding on A's rows, PEFT parity (logits and gradients, with a bias),
and W never read in the forward."""
import copy
import warnings

import pytest
import torch

import lora_lite as ll
from lora_lite.testing import check_variant, logits, make_batch, quantize, tiny_llama
from lora_lite_dora.dora import row_norm

warnings.filterwarnings("ignore", message="MatMul8bitLt")

TARGETS = [r"q_proj$", r"v_proj$"]


def with_bias(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            module.bias = torch.nn.Parameter(0.1 * torch.randn(module.out_features, generator=g))
    return model


MAKERS = {
    "fp32+bias": lambda: with_bias(tiny_llama()),
    "4bit+bias": lambda: quantize(with_bias(tiny_llama()), "4bit"),
    "8bit+bias": lambda: quantize(with_bias(tiny_llama()), "8bit"),
}


def cfg_of(variant="dora", **kw):
    return ll.config(variant, **{"r": 4, "alpha": 8, "target_names": TARGETS, **kw})


def train(model, steps=3, lr=1e-2):
    batch = make_batch()
    opt = torch.optim.AdamW(ll.trainable_parameters(model), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()


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
    train(model)
    for t in ll.attached(model).targets:
        layer, s = t.layer, t.layer._lora_cfg.scale
        with torch.no_grad():
            W = ll.dense_weight(layer)
            want = (W + s * layer.lora_B @ layer.lora_A).norm(dim=1)
            got = row_norm(layer, like=torch.zeros(1))
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
    train(model, steps=2)
    assert not torch.equal(logits(model, make_batch()), before)


def peft_pair():
    from peft import LoraConfig, get_peft_model
    base = MAKERS["fp32+bias"]()
    ours = copy.deepcopy(base)
    ll.attach(ours, cfg_of())
    train(ours)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, use_dora=True))
    pairs = []
    with torch.no_grad():
        for name, module in theirs.named_modules():
            if "default" in getattr(module, "lora_A", {}):
                layer = ours.get_submodule(name.replace("base_model.model.", ""))
                module.lora_A["default"].weight.copy_(layer.lora_A)
                module.lora_B["default"].weight.copy_(layer.lora_B)
                module.lora_magnitude_vector["default"].weight.copy_(layer.lora_m)
                pairs.append((module, layer))
    return ours, theirs, pairs


def test_peft_parity_logits_and_gradients():
    ours, theirs, pairs = peft_pair()
    batch = make_batch()
    assert (logits(ours, batch) - logits(theirs, batch)).abs().max() < 1e-5
    for model in (ours, theirs):
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
    for module, layer in pairs:
        for mine, peft_t in [(layer.lora_A, module.lora_A["default"].weight),
                             (layer.lora_B, module.lora_B["default"].weight),
                             (layer.lora_m, module.lora_magnitude_vector["default"].weight)]:
            assert (mine.grad - peft_t.grad).abs().max() <= 1e-5 * peft_t.grad.abs().max()
