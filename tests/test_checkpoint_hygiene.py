"""Checkpoints written while an adapter is attached never carry a changed base weight.

For every variant, ``model.save_pretrained`` (and ``transformers.Trainer.save_model``) while
attached: ``from_pretrained`` of the folder gives the base model bit for bit. The persistent
adapter tensors (``<layer>.lora_*``) are written too, deliberately: transformers reports them as
unexpected keys and ignores them, and a fresh base with the same adapter attached takes them back
with ``load_state_dict(strict=True)``. Base-rewriting variants (opt-in ``rewrite_base=True``)
show the original weight in ``state_dict()`` (fp32 and bnb 4bit), while computing with W_res."""
import pytest
import torch
from interop_cases import (
    adapted_model,
    calibration,
    installed,
    rel_err,
    third_party_variant,  # noqa: F401  (fixture)
)
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import lora_lite as ll
from lora_lite.testing import logits, make_batch, quantize, snapshot_state, state_equal, tiny_llama

BATCH = make_batch()
pytestmark = pytest.mark.usefixtures("third_party_variant")
REWRITERS = [n for n in ("pissa", "antipasto", "antipasto_rot", "antipasto_arrow") if n in installed()]


def saved_keys(folder):
    return set(load_file(str(folder / "model.safetensors")))


@pytest.mark.parametrize("name", installed())
def test_save_pretrained_while_attached_reloads_the_base_bit_for_bit(name, tmp_path):
    original = snapshot_state(tiny_llama())
    model, cfg = adapted_model(name)
    adapted = logits(model, BATCH)
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert state_equal(snapshot_state(reloaded), original)
    adapter_keys = {k for k in model.state_dict() if ".lora_" in k}
    assert saved_keys(tmp_path) == set(original) | adapter_keys   # adapter tensors: written
    fresh = tiny_llama()
    ll.attach(fresh, cfg, calibration_data=calibration(name))
    fresh.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)
    assert rel_err(logits(fresh, BATCH), adapted) <= 1e-6         # and loadable back


@pytest.mark.parametrize("name", REWRITERS)
def test_the_default_no_longer_rewrites_the_base(name):
    model, _ = adapted_model(name)
    assert not ll.attached(model).cfg.rewrite_base
    assert not any(hasattr(m, "_lora_lite_base_snapshot") for m in model.modules())


@pytest.mark.parametrize("kind", [None, "4bit"])
@pytest.mark.parametrize("name", REWRITERS)
def test_an_opt_in_rewrite_shows_the_original_weight_in_the_state_dict(name, kind, tmp_path):
    make = (lambda: quantize(tiny_llama(), kind)) if kind else tiny_llama  # noqa: E731
    original = snapshot_state(make())
    model, _ = adapted_model(name, make_model=make, rewrite_base=True)
    assert any(hasattr(m, "_lora_lite_base_snapshot") for m in model.modules())  # W_res in use
    adapted = logits(model, BATCH)
    state = model.state_dict()
    assert state_equal({k: state[k] for k in original}, original)
    assert torch.equal(logits(model, BATCH), adapted)       # the state dict did not disturb it
    if kind is None:
        model.save_pretrained(tmp_path)
        assert state_equal(snapshot_state(LlamaForCausalLM.from_pretrained(tmp_path)), original)


def test_the_state_dict_guard_fires_only_for_rewritten_layers():
    """Without the guard the rewritten residual would be in the state dict (the bug)."""
    model = tiny_llama()
    layer = model.model.layers[0].self_attn.q_proj
    before = layer.weight.detach().clone()
    ll.set_dense_weight(layer, before + 1.0)
    assert torch.equal(model.state_dict()["model.layers.0.self_attn.q_proj.weight"], before)
    assert torch.equal(layer.weight, before + 1.0)
    from lora_lite.layers.weights import restore_base_weight
    restore_base_weight(layer)
    assert not layer._state_dict_hooks


@pytest.mark.parametrize("name", ["pissa", "antipasto"])
def test_trainer_save_model_while_attached(name, tmp_path):
    from transformers import Trainer, TrainingArguments
    if name not in installed():
        pytest.skip(f"{name} not installed")
    original = snapshot_state(tiny_llama())
    model, _ = adapted_model(name, rewrite_base=(name == "antipasto"))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    Trainer(model=model, args=args).save_model(str(tmp_path / "ckpt"))
    assert state_equal(snapshot_state(LlamaForCausalLM.from_pretrained(tmp_path / "ckpt")), original)
