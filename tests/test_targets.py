import pytest
import torch
from lltest import lora_cfg
from torch import nn

import lora_lite as ll
from lora_lite.targets import find_targets


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


def test_ambiguous_square_is_an_error_only_when_roles_are_asked():
    model = WithAmbiguousSquare()
    # default (no roles asked): attached with role "square", never an error
    found = find_targets(model, ll.config("lora", r=2, target_names=[r"mixer"]))
    assert [(t.name, t.role) for t in found] == [("mixer", "square")]
    assert "mixer" in [t.name for t in find_targets(model, ll.config("lora", r=2))]
    with pytest.raises(ll.AttachError, match="mixer.*target_roles=\\(\\)"):
        find_targets(model, ll.config("lora", r=2, target_names=[r"mixer"], target_roles=["reader"]))


def test_no_match_is_a_clear_error(model):
    with pytest.raises(ll.AttachError, match="no layer matched"):
        ll.attach(model, lora_cfg(target_names=[r"nonexistent"]))
    assert ll.attached(model) is None


def test_bnb_layers_are_linear_like():
    from lora_lite.testing import quantize, tiny_llama
    q = quantize(tiny_llama(), "4bit")
    names = [t.name for t in find_targets(q, lora_cfg())]
    assert len(names) == 4 and type(q.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


# -- default targets ("all-linear" minus the head), layers=, roles on 21 architectures --------------
from lora_lite.targets import layer_index, output_head_ids  # noqa: E402
from lora_lite.testing.tiny_models import ARCHS  # noqa: E402

TRANSFORMERS_ARCHS = sorted(a for a in ARCHS if a != "mlp")


def default_names(model, **kw):
    return [t.name for t in find_targets(model, ll.config("lora", r=2, **kw))]


# PEFT's all-linear also wraps these models' fused routed experts (3-D parameters, not Linear) and
# their router: lora-lite's defaults adapt the experts as parameter targets and leave the router
# out by design (routing stays the base model's).
_FUSED_EXPERT_ARCHS = ("mixtral", "olmoe", "qwen3_moe", "gpt_oss")
_PEFT_WRAPS_EXPERTS = ("mixtral", "olmoe", "qwen3_moe")  # its all-linear leaves GPT-OSS's alone
ALL_LINEAR_CASES = TRANSFORMERS_ARCHS


@pytest.mark.parametrize("arch", ALL_LINEAR_CASES)
def test_default_targets_are_peft_all_linear(arch):
    """With no target_names: every nn.Linear / Conv1D but the output head, as PEFT's 'all-linear';
    on MoE models also the routed experts' module (through parameter targets), not the router."""
    from peft import LoraConfig, get_peft_model

    from lora_lite.param_targets import find_param_targets
    model = ARCHS[arch].build()
    ours = default_names(model)
    experts = {t.module_name for t in find_param_targets(model, ll.config("lora"))}
    twin = get_peft_model(ARCHS[arch].build(), LoraConfig(r=2, target_modules="all-linear"))
    theirs = [n.removeprefix("base_model.model.") for n, m in twin.named_modules()
              if hasattr(m, "lora_A") and not n.endswith(("lora_A", "lora_B", ".base_layer"))]
    if arch in _FUSED_EXPERT_ARCHS:
        assert experts and (experts <= set(theirs)) == (arch in _PEFT_WRAPS_EXPERTS)
        routers = {n for n in theirs if n.endswith((".mlp.gate", ".mlp.router"))}
        assert not routers & set(ours)
        theirs = [n for n in theirs if n not in routers]
        ours = ours + sorted(experts & set(theirs))
    else:
        assert not experts
    assert sorted(ours) == sorted(theirs) and len(ours) >= 8


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_default_attach_works_and_excludes_the_head(arch):
    model = ARCHS[arch].build()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    ll.attach(model, ll.config("lora", r=2))
    names = [t.name for t in ll.attached(model).targets]
    modules = dict(model.named_modules())
    assert head is None or all(modules[n] is not head for n in names)
    assert not any(isinstance(modules[n], nn.Embedding) for n in names)
    ll.detach(model)


def test_bert_vocabulary_head_is_not_a_default_target():
    names = default_names(ARCHS["bert"].build())
    assert "cls.predictions.decoder" not in names and "cls.predictions.transform.dense" in names


class TiedToy(nn.Module):
    """No get_output_embeddings: the head is found by its weight tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.mix = nn.Linear(8, 8)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids):
        return self.out(self.mix(self.embed(ids)))


def test_tied_head_found_by_weight_not_name():
    model = TiedToy()
    assert output_head_ids(model) == {id(model.out)}
    assert default_names(model) == ["mix"]
    assert default_names(model, target_names=[r"^out$"]) == ["out"]  # named: the user's choice


def test_multihead_attention_projection_is_never_a_target():
    """nn.MultiheadAttention reads out_proj.weight itself: a hook there would never run."""
    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.ff = nn.Linear(8, 8)

        def forward(self, x):
            return self.ff(self.attn(x, x, x)[0])
    model = WithMHA()
    calls = []
    handle = model.attn.out_proj.register_forward_hook(lambda *a: calls.append(1))
    model(torch.randn(1, 3, 8))
    handle.remove()
    assert calls == []                                   # the reason for the rule
    assert default_names(model) == ["ff"]


LAYER0 = {  # a block-0 target of each, and a name that must NOT be picked by layers=[0]
    "t5": ("encoder.block.0.layer.0.SelfAttention.q", "encoder.block.1.layer.0.SelfAttention.q"),
    "gpt2": ("transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"),
    "falcon": ("transformer.h.0.self_attention.query_key_value", "transformer.h.1.mlp.dense_4h_to_h"),
    "gpt_neox": ("gpt_neox.layers.0.attention.query_key_value", "gpt_neox.layers.1.attention.dense"),
    "bert": ("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.output.dense"),
    "opt": ("model.decoder.layers.0.fc1", "model.decoder.layers.1.fc1"),
    "llama": ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"),
}


@pytest.mark.parametrize("arch", sorted(LAYER0))
def test_layers_selects_transformer_blocks(arch):
    model = ARCHS[arch].build()
    names = default_names(model, layers=[0])
    keep, drop = LAYER0[arch]
    assert keep in names and drop not in names
    assert all(layer_index(n) == 0 for n in names)
    every = default_names(model)
    assert len(names) == sum(1 for n in every if layer_index(n) == 0)  # block 0 complete


def test_layer_index_takes_the_block_not_the_sub_layer():
    assert layer_index("decoder.block.1.layer.0.SelfAttention.q") == 1
    assert layer_index("model.layers.3.block_sparse_moe.experts.5.w1") == 3
    assert layer_index("transformer.h.2.mlp.c_fc") == 2
    assert layer_index("cls.predictions.transform.dense") is None


def test_layers_on_a_model_without_blocks_says_so():
    with pytest.raises(ll.AttachError, match="no transformer blocks"):
        find_targets(WithAmbiguousSquare(), ll.config("lora", r=2, layers=[0]))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_role_filter_never_breaks_on_any_architecture(arch):
    model = ARCHS[arch].build()
    writers = find_targets(model, ll.config("lora", r=2, target_roles=["writer"]))
    assert writers and all(t.role == "writer" for t in writers)
