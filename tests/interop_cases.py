"""One row per variant for the interop tests (merge, PEFT export, checkpoints): the knobs that fit
the tiny Llama (hidden 64, kv width 32, MLP 128). A variant installed without a row gets the
default row (r=4 on q/v), so every installed variant runs the whole suite."""
import torch

import lora_lite as ll
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
}
# the variants PEFT has (native export must load in PEFT within 1e-5)
PEFT_SHARED = ("lora", "pissa", "dora", "delora", "eva", "ia3", "ia3_ff", "hra", "road", "vera")


def installed():
    return sorted(ll.variants())


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
