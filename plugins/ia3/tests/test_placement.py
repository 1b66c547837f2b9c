"""ia3 / ia3_ff default targets per architecture (placement.py), never a silent wrong match."""
import pytest

import lora_lite as ll
from lora_lite.testing.tiny_models import ARCHS

EXPECTED = {  # architecture -> (ia3's default leaf names, ia3_ff's)
    "llama": ({"k_proj", "v_proj"}, {"down_proj"}),
    "qwen2": ({"k_proj", "v_proj"}, {"down_proj"}),
    "qwen3": ({"k_proj", "v_proj"}, {"down_proj"}),
    "mistral": ({"k_proj", "v_proj"}, {"down_proj"}),
    "gemma2": ({"k_proj", "v_proj"}, {"down_proj"}),
    "phi3": ({"qkv_proj"}, {"down_proj"}),                    # fused: gated whole, as PEFT
    "gpt_neox": ({"query_key_value"}, {"dense_4h_to_h"}),
    "falcon": ({"query_key_value"}, {"dense_4h_to_h"}),
    "opt": ({"k_proj", "v_proj"}, {"fc2"}),
    "bert": ({"attention.self.key", "attention.self.value"}, {"output.dense"}),
    "t5": ({"SelfAttention.k", "SelfAttention.v", "EncDecAttention.k", "EncDecAttention.v"},
           {"DenseReluDense.wo"}),
    "gpt2": ({"attn.c_attn"}, {"mlp.c_proj"}),
}


def leaves(names, example):
    depth = example.count(".") + 1
    return {".".join(n.split(".")[-depth:]) for n in names}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_default_placement(arch):
    model = ARCHS[arch].build()
    for variant, want in zip(("ia3", "ia3_ff"), EXPECTED[arch], strict=True):
        names = [t.name for t in ll.find_targets(model, ll.config(variant))]
        assert leaves(names, next(iter(want))) == want, (variant, names)


def test_bert_ff_gate_is_the_feed_forward_output_not_the_attention_output():
    names = [t.name for t in ll.find_targets(ARCHS["bert"].build(), ll.config("ia3_ff"))]
    assert names == ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]


def test_phi3_fused_qkv_is_not_mistaken_for_v_proj():
    """The old default regex v_proj$ silently matched Phi-3's qkv_proj; the map names it."""
    from lora_lite_ia3.placement import KEY_VALUE
    assert KEY_VALUE["phi3"] == (r"\.qkv_proj$",)
    import re
    assert re.search(r"(?:^|\.)(?:k_proj|v_proj)$", "model.layers.0.self_attn.qkv_proj") is None


def test_unknown_architecture_uses_exact_leaf_names_or_lists_candidates():
    model = ARCHS["mlp"].build()
    for variant in ("ia3", "ia3_ff"):
        with pytest.raises(ll.AttachError, match=r"target_names=\[\.\.\.\].*layers\.N\.up \(32->64\)"):
            ll.attach(model, ll.config(variant))
        assert ll.attached(model) is None
    llama = ARCHS["llama"].build()
    llama.config.model_type = "my_llama_clone"               # unknown type, llama-style names
    names = [t.name for t in ll.find_targets(llama, ll.config("ia3"))]
    assert names and all(n.endswith(("k_proj", "v_proj")) for n in names)


def test_explicit_target_names_win():
    model = ARCHS["gpt2"].build()
    names = [t.name for t in ll.find_targets(model, ll.config("ia3", target_names=[r"mlp\.c_fc$"]))]
    assert names == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
