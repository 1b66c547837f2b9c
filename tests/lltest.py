"""Shared helpers for the cross-package tests (importable: pytest pythonpath includes tests/)."""
import torch

import lora_lite as ll
from lora_lite.testing import registered  # noqa: F401  (re-exported for the tests here)

QV = dict(target_names=[r"q_proj$", r"v_proj$"], target_roles=())


def lora_cfg(**kw):
    return ll.config("lora", **{"r": 4, **QV, **kw})


def hooks_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def assert_untouched(model, before_state, before_logits, batch):
    from lora_lite.testing import logits, snapshot_state, state_equal
    assert ll.attached(model) is None
    assert hooks_count(model) == 0
    assert state_equal(snapshot_state(model), before_state)
    assert not any(n.split(".")[-1].startswith("lora_") for n, _ in model.named_parameters())
    assert not any(n.split(".")[-1].startswith("lora_") for n, _ in model.named_buffers())
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(logits(model, batch), before_logits)
