import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.targets import find_targets

from lltest import lora_cfg


def roles(model, **kw):
    return {t.name: t.role for t in find_targets(model, lora_cfg(**kw))}


def test_roles_on_llama(model):
    found = roles(model, target_names=(), target_roles=())
    assert found["model.layers.0.self_attn.q_proj"] == "reader"     # 64 -> 64, named
    assert found["model.layers.0.self_attn.k_proj"] == "reader"     # 64 -> 32 (GQA)
    assert found["model.layers.0.self_attn.o_proj"] == "writer"     # 64 -> 64, named
    assert found["model.layers.0.mlp.up_proj"] == "reader"          # 64 -> 128
    assert found["model.layers.1.mlp.down_proj"] == "writer"        # 128 -> 64
    assert not any("lm_head" in n or "embed" in n for n in found)   # excluded by default


def test_role_filter_and_layers(model):
    found = roles(model, target_names=(), target_roles=("writer",), layers=[1])
    assert sorted(found) == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"]


def test_exclude_names(model):
    found = roles(model, target_names=[r"proj$"], target_roles=(), exclude_names=[r"mlp"])
    assert found and not any("mlp" in n for n in found)


class WithAmbiguousSquare(nn.Module):
    """A model with a square layer whose role cannot be told from its name."""

    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"hidden_size": 8})()
        self.q_proj = nn.Linear(8, 8)
        self.mixer = nn.Linear(8, 8)       # ambiguous square layer
        self.up = nn.Linear(8, 16)

    def forward(self, x):
        return self.up(self.mixer(self.q_proj(x)))


def test_untargeted_ambiguous_square_does_not_break_attach():
    # upstream raised "ambiguous role" here even though `mixer` is not targeted
    model = WithAmbiguousSquare()
    cfg = ll.config("lora", r=2, target_names=[r"q_proj"])
    assert [t.name for t in find_targets(model, cfg)] == ["q_proj"]
    ll.attach(model, cfg)
    ll.detach(model)


def test_targeted_ambiguous_square_is_a_clear_error():
    model = WithAmbiguousSquare()
    with pytest.raises(ll.AttachError, match="mixer.*target_roles=\\(\\)"):
        find_targets(model, ll.config("lora", r=2, target_names=[r"mixer"]))
    found = find_targets(model, ll.config("lora", r=2, target_names=[r"mixer"], target_roles=()))
    assert [(t.name, t.role) for t in found] == [("mixer", "square")]


def test_no_match_is_a_clear_error(model):
    with pytest.raises(ll.AttachError, match="no layer matched"):
        ll.attach(model, lora_cfg(target_names=[r"nonexistent"]))
    assert ll.attached(model) is None


def test_bnb_layers_are_linear_like():
    from lora_lite.testing import quantize, tiny_llama
    q = quantize(tiny_llama(), "4bit")
    names = [t.name for t in find_targets(q, lora_cfg())]
    assert len(names) == 4 and type(q.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
