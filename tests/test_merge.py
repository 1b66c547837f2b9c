"""ll.merge: every installed variant folds into the base exactly (fp32 <= 1e-5), leaves a plain
model (base keys only, no hooks, no snapshot that could resurrect), merges on bnb 4bit/8bit bases
with the requantization error reported (or dense=True), and refuses before touching anything."""
import dataclasses

import pytest
import torch
from interop_cases import (
    adapted_model,
    biased_llama,
    installed,
    perturb,
    rel_err,
    third_party_variant,  # noqa: F401  (fixture)
)
from lltest import QV, hooks_count, registered
from torch import nn

import lora_lite as ll
from lora_lite.testing import logits, make_batch, quantize, same_kernel_logits, snapshot_state, state_equal, tiny_llama

BATCH = make_batch()
pytestmark = pytest.mark.usefixtures("third_party_variant")


def assert_plain(model, base_keys):
    assert ll.attached(model) is None
    assert hooks_count(model) == 0
    assert list(model.state_dict()) == base_keys
    assert not any("lora" in n for n, _ in list(model.named_parameters()) + list(model.named_buffers()))
    assert not any(k.startswith("_lora") for m in model.modules() for k in vars(m))


@pytest.mark.parametrize("name", installed())
def test_merge_is_exact_and_final(name):
    base_keys = list(tiny_llama().state_dict())
    model, _ = adapted_model(name)
    adapted = logits(model, BATCH)
    assert rel_err(adapted, logits(tiny_llama(), BATCH)) > 1e-4   # the adapter does something
    report = ll.merge(model)
    assert_plain(model, base_keys)
    assert rel_err(logits(model, BATCH), adapted) <= 1e-5
    assert report["variant"] == name and report["max_write_error"] == 0.0
    assert all(p.requires_grad for p in model.parameters())
    merged = snapshot_state(model)
    with pytest.raises(ll.AttachError):
        ll.detach(model)
    ll.attach(model, ll.config("lora", r=2, **QV))
    ll.detach(model)   # detach after a later adapter: the merged weights stay (no resurrection)
    assert state_equal(snapshot_state(model), merged)


@pytest.mark.parametrize("name", ["pissa", "antipasto_rot"])
def test_merge_of_an_opt_in_base_rewrite_is_exact(name):
    if name not in installed():
        pytest.skip(f"{name} not installed")
    model, _ = adapted_model(name, rewrite_base=True)
    adapted = logits(model, BATCH)
    ll.merge(model)
    assert rel_err(logits(model, BATCH), adapted) <= 1e-5
    assert not any(m._state_dict_hooks for m in model.modules())


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
@pytest.mark.parametrize("name", installed())
def test_merge_on_quantized_bases_reports_the_requantization_error(name, kind):
    make = lambda: quantize(tiny_llama(), kind)  # noqa: E731
    base_keys = list(make().state_dict())
    model, _ = adapted_model(name, make_model=make)
    adapted = same_kernel_logits(model, BATCH)
    report = ll.merge(model)
    assert_plain(model, base_keys)
    errors = [v["write_error"] for v in report["layers"].values()]
    assert all(0 < e < 0.3 for e in errors), report   # requantized: a real, bounded error
    assert {v["backend"] for v in report["layers"].values()} == {f"bitsandbytes-{kind}"}
    assert rel_err(same_kernel_logits(model, BATCH), adapted) < 0.5

    dense, _ = adapted_model(name, make_model=make)
    report = ll.merge(dense, dense=True)
    assert report["max_write_error"] == 0.0
    targets = list(report["layers"])
    assert all(type(dense.get_submodule(t)) is nn.Linear for t in targets)
    # the adapted function, unquantized (8bit: the adapted model itself ran q/v on int8 inputs)
    assert rel_err(same_kernel_logits(dense, BATCH), adapted) <= (1e-5 if kind == "4bit" else 3e-2)


@pytest.mark.parametrize("name", ["ia3", "road"])
def test_merge_carries_a_changed_bias(name):
    model, _ = adapted_model(name, make_model=biased_llama)
    adapted = logits(model, BATCH)
    ll.merge(model)
    assert rel_err(logits(model, BATCH), adapted) <= 1e-5
    assert list(model.state_dict()) == list(biased_llama().state_dict())


def lora_like(name, **attrs):
    """A LoRA subclass under another name, with some attributes replaced."""
    lora = ll.get_variant("lora")

    @dataclasses.dataclass
    class Config(lora.config):
        variant: str = name
    return type(name, (lora,), {"name": name, "config": Config, **attrs})


def wrong_shape(layer, cfg):
    return torch.zeros(3, 3), None


@pytest.mark.parametrize("attrs, needle", [
    ({"mergeable": False, "merge_refusal": "its output is not linear in x"}, "not linear in x"),
    ({"merged_weight": None}, "no merged_weight"),
    ({"merged_weight": staticmethod(wrong_shape)}, "shape"),
])
def test_merge_refuses_before_touching_anything(model, attrs, needle):
    with registered(lora_like("refused_test", **attrs)):
        before = snapshot_state(model)
        ll.attach(model, ll.config("refused_test", r=4, **QV))
        perturb(model)
        adapted = logits(model, BATCH)
        with pytest.raises(ll.AttachError, match=needle):
            ll.merge(model)
        assert ll.attached(model) is not None and torch.equal(logits(model, BATCH), adapted)
        ll.detach(model)
        assert state_equal(snapshot_state(model), before)
    with pytest.raises(ll.AttachError, match="no lora-lite adapter"):
        ll.merge(model)


def test_merge_on_a_bf16_base_reports_the_cast_error():
    make = lambda: tiny_llama().to(torch.bfloat16)  # noqa: E731
    model, _ = adapted_model("lora", make_model=make)
    adapted = logits(model, BATCH)
    report = ll.merge(model)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert 0 < report["max_write_error"] < 1e-2            # bf16 rounding of W'
    assert rel_err(logits(model, BATCH), adapted) < 5e-2
