"""lora_lite.testing.tiny_models: every architecture builds offline, runs its batch to finite logits and
loss; the MoE models hold their routed experts as fused, non-square 3-D parameters."""
import pytest
import torch

from lora_lite.testing import tiny_models
from lora_lite.testing.arch_matrix import is_fused_experts
from lora_lite.testing.tiny_models import ARCHS, MOE


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_each_model_runs_its_batch(name):
    arch = ARCHS[name]
    model, batch = arch.build(), arch.batch()
    out = arch.outputs(model, batch)
    assert torch.isfinite(out).all() and torch.isfinite(arch.loss(model, batch))


@pytest.mark.parametrize("name", MOE)
def test_moe_experts_are_fused_non_square_parameters(name):
    model, _ = getattr(tiny_models, f"tiny_{name}")()
    experts = {n: m for n, m in model.named_modules() if is_fused_experts(m)}
    assert sorted(experts) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    for module in experts.values():
        for pname in ("gate_up_proj", "down_proj"):
            shape = getattr(module, pname).shape
            assert len(shape) == 3 and shape[0] == 4 and shape[1] != shape[2], (pname, shape)


@pytest.mark.parametrize("name", ["gemma3", "vit", "clip", "whisper"])
def test_named_builders(name):
    model, batch = getattr(tiny_models, f"tiny_{name}")()
    assert type(model).__name__ == type(ARCHS[name].build()).__name__ and batch
