"""One row per variant for the interop tests (merge, PEFT export, checkpoints): the knobs that fit
the tiny Llama (hidden 64, kv width 32, MLP 128). A variant installed without a row gets the
default row (r=4 on q/v), so every installed variant runs the whole suite. The third-party
example (VeRA) runs too: registered in-process from its source when it is not installed."""
import os
import sys

import pytest
import torch

import lora_lite as ll
import lora_lite.plugins as plugins
from lora_lite.testing import make_batch, tiny_llama

QV = (r"q_proj$", r"v_proj$")
DEFAULT_ROW = {"r": 4, "target_names": QV}
ROWS = {
    "ia3": {"target_names": (r"k_proj$", r"v_proj$")},
    "ia3_ff": {"target_names": (r"down_proj$",)},
    "road": {"group_size": 32, "target_names": QV},
    "vera": {"r": 8, "target_names": (r"q_proj$", r"o_proj$")},   # one shape: PEFT shares A, B
    "antipasto": {"r": 8, "target_names": QV},
    "antipasto_rot": {"r": 8, "block_size": 4, "rotate_basis": "both", "target_names": QV},
    "antipasto_arrow": {"r": 8, "block": 2, "target_names": QV},
    "antipasto_corda": {"r": 8, "target_names": QV},
    "antipasto_asvd": {"r": 8, "target_names": QV},
    "antipasto_dplr": {"r": 8, "lora_rank": 2, "target_names": QV},
    # alpha well inside (0, 1) so that perturb() cannot switch a layer's ablation off
    "antipasto_ablate": {"r": 8, "k": 2, "init_alpha": 0.5, "target_names": QV},
    "oft": {"block_size": 16, "target_names": QV},
    # m = 1: PEFT without its CUDA extension silently runs one butterfly factor, so it is no
    # oracle for m > 1 here (the oft plugin's own tests cover m > 1 with a stand-in extension)
    "boft": {"block_size": 4, "n_butterfly_factor": 1, "target_names": QV},
}
# the variants PEFT has (native export must load in PEFT within 1e-5)
PEFT_SHARED = ("lora", "pissa", "dora", "delora", "eva", "ia3", "ia3_ff", "hra", "road", "vera",
               "oft", "boft")


THIRD_PARTY_SRC = os.path.join(os.path.dirname(__file__), "..", "third_party_example", "src")
THIRD_PARTY = "vera"


def installed():
    """Every installed variant, plus the third-party example's (see ``third_party_variant``)."""
    names = set(ll.variants())
    if os.path.isdir(THIRD_PARTY_SRC):
        names.add(THIRD_PARTY)
    return sorted(names)


@pytest.fixture(scope="module", autouse=False)
def third_party_variant():
    """Register the third-party VeRA from its source for this module if it is not installed."""
    if THIRD_PARTY in ll.variants() or not os.path.isdir(THIRD_PARTY_SRC):
        yield
        return
    sys.path.insert(0, os.path.abspath(THIRD_PARTY_SRC))
    from lora_lite_vera import plugin
    plugins.register_plugin(plugin, name="interop-vera", distribution="lora-lite-vera (source)")
    try:
        yield
    finally:
        plugins.unregister_plugin("interop-vera")
        sys.path.remove(os.path.abspath(THIRD_PARTY_SRC))


def make_config(name, **extra):
    return ll.config(name, **{**ROWS.get(name, DEFAULT_ROW), "target_roles": (), **extra})


def calibration(name):
    return [make_batch(seed=5)] if getattr(ll.get_variant(name), "needs_calibration", False) else None


def perturb(model, seed=1, size=0.3):
    """Random non-zero values in every trainable adapter tensor (an adapter that does something)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ll.trainable_parameters(model):
            p.add_(size * torch.randn(p.shape, generator=g).to(p.dtype))


def adapted_model(name, make_model=tiny_llama, **extra):
    """(model with a perturbed ``name`` adapter attached, its config)."""
    model = make_model()
    cfg = make_config(name, **extra)
    ll.attach(model, cfg, calibration_data=calibration(name))
    perturb(model)
    return model, cfg


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def biased_llama():
    """A tiny Llama whose attention projections have biases (for the bias-changing variants)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, vocab_size=128,
                         max_position_embeddings=128, tie_word_embeddings=False, attention_bias=True)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    return model
