"""Gradient checkpointing with an adapter attached: the same loss (1e-6) and adapter gradients
(1e-5) as without, for every installed variant (so every hook kind: input, output, both) on a
tiny Llama, with transformers' default (use_reentrant=False) and the reentrant checkpoint.

The reentrant checkpoint only back-propagates into a block whose inputs require grad; with a
frozen base, transformers' gradient_checkpointing_enable calls enable_input_require_grads for
input_ids models, which is what makes it work (the last test shows the failure without it)."""
import copy

import pytest
import torch
from tiny_knobs import TINY_KNOBS

import lora_lite as ll
from lora_lite.testing.arch_matrix import calibration, tiny_config
from lora_lite.testing.tiny_models import ARCHS

VARIANTS = sorted(ll.variants())
ARCH = ARCHS["llama"]


def adapted(variant, arch=ARCH, **kw):
    model, batch = arch.build(), arch.batch()
    ll.attach(model, tiny_config(variant, TINY_KNOBS.get(variant), **kw),
              calibration_data=calibration(variant, batch))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the init, so that every tensor's gradient is non-trivial
        for p in ll.trainable_parameters(model):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.train(), batch


def loss_and_grads(model, batch, arch=ARCH):
    for p in ll.trainable_parameters(model):
        p.grad = None
    loss = arch.loss(model, batch)
    if loss.requires_grad:  # (not when no adapter tensor took part: the broken case below)
        loss.backward()
    return loss.item(), {n: (None if p.grad is None else p.grad.clone())
                         for n, p in ll.adapter_tensors(model).items() if p.requires_grad}


def mismatches(plain, checkpointed):
    """What differs between two (loss, grads) results (empty: equal within 1e-6 / 1e-5)."""
    (loss, grads), (loss_gc, grads_gc) = plain, checkpointed
    out = [] if abs(loss - loss_gc) <= 1e-6 else [f"loss {loss} vs {loss_gc}"]
    for name, g in grads.items():
        h = grads_gc[name]
        if g is None or h is None:
            out.append(f"{name}: no gradient" + (" with checkpointing" if h is None else ""))
        elif (g - h).abs().max().item() > 1e-5 * max(1.0, g.abs().max().item()):
            out.append(f"{name}: max |Δgrad| {(g - h).abs().max().item():.2e}")
    return out


def checkpointing_on(model, reentrant):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_the_variants_cover_every_hook_kind():
    assert {ll.hook_kind(ll.get_variant(v)) for v in VARIANTS} == {"input", "output", "input+output"}


@pytest.mark.parametrize("reentrant", [False, True], ids=["default", "reentrant"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpointing_gives_the_same_loss_and_gradients(variant, reentrant):
    model, batch = adapted(variant)
    plain = loss_and_grads(model, batch)
    assert all(g is not None for g in plain[1].values())
    checkpointing_on(model, reentrant)
    assert mismatches(plain, loss_and_grads(model, batch)) == []


def test_checkpointing_with_lora_on_the_embedding_too():
    model, batch = adapted("lora", target_names=[r"embed_tokens$", r"q_proj$", r"down_proj$"])
    plain = loss_and_grads(model, batch)
    checkpointing_on(model, reentrant=True)
    assert mismatches(plain, loss_and_grads(model, batch)) == []


@pytest.mark.parametrize("arch", ["mixtral", "whisper", "vit"])
def test_checkpointing_on_other_architectures(arch):
    """MoE, encoder-decoder speech, vision (pixel inputs: the default non-reentrant checkpoint)."""
    a = ARCHS[arch]
    model, batch = adapted("lora", arch=a)
    plain = loss_and_grads(model, batch, a)
    checkpointing_on(model, reentrant=False)
    assert mismatches(plain, loss_and_grads(model, batch, a)) == []


def test_the_comparison_catches_reentrant_checkpointing_without_input_grads():
    model, batch = adapted("lora")
    plain = loss_and_grads(model, batch)
    broken = copy.deepcopy(model)
    checkpointing_on(broken, reentrant=True)
    broken.disable_input_require_grads()  # the frozen embedding's output: no grad into the blocks
    with pytest.warns(UserWarning, match="requires_grad"):
        problems = mismatches(plain, loss_and_grads(broken, batch))
    assert problems and all("no gradient with checkpointing" in p for p in problems)
