"""Where IA3's gates go on each architecture, by ``model.config.model_type``.

``ia3`` gates the key and value projections, ``ia3_ff`` the feed-forward down projection (the
paper's placement). With no ``target_names``, lora-lite asks the variant's
``default_target_names(model)``, answered from these maps:

    model type                               ia3 (k, v)                       ia3_ff (down)
    llama, mistral, qwen2, qwen3, gemma(2)   k_proj, v_proj                   down_proj
    phi3                                     qkv_proj (fused, gated whole)    down_proj
    gpt_neox, falcon, bloom                  query_key_value (fused)          dense_4h_to_h
    gpt2                                     attn.c_attn (fused)              mlp.c_proj
    opt, bart                                k_proj, v_proj                   fc2
    bert, roberta                            attention.self.key/value         layer.N.output.dense
    t5, mt5                                  SelfAttention/EncDecAttention k, v   DenseReluDense.wo

A fused q/k/v projection is gated whole (q's outputs too), as PEFT's IA3 defaults do. Another
model type gets layers whose last name is exactly ``k_proj``/``v_proj`` (``down_proj``); when it
has none, attach fails listing the model's linear-like layers: name them with target_names.
Never a bare ``v_proj$``, which also matches Phi-3's fused ``qkv_proj``.
"""
import re

import lora_lite as ll

_KV_PROJ = (r"(?:^|\.)(?:k_proj|v_proj)$",)
_DOWN_PROJ = (r"(?:^|\.)down_proj$",)
_QKV_FUSED = (r"\.query_key_value$",)

KEY_VALUE = {
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
                     "gemma", "gemma2", "gemma3_text", "opt", "bart"), _KV_PROJ),
    "phi3": (r"\.qkv_proj$",),
    **dict.fromkeys(("gpt_neox", "falcon", "bloom"), _QKV_FUSED),
    "gpt2": (r"\.attn\.c_attn$",),
    **dict.fromkeys(("bert", "roberta"), (r"\.attention\.self\.(?:key|value)$",)),
    **dict.fromkeys(("t5", "mt5"), (r"\.(?:SelfAttention|EncDecAttention)\.(?:k|v)$",)),
}
DOWN = {
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2",
                     "gemma3_text", "phi3"), _DOWN_PROJ),
    **dict.fromkeys(("opt", "bart"), (r"\.fc2$",)),
    **dict.fromkeys(("gpt_neox", "falcon", "bloom"), (r"\.dense_4h_to_h$",)),
    "gpt2": (r"\.mlp\.c_proj$",),
    **dict.fromkeys(("bert", "roberta"), (r"\.layer\.\d+\.output\.dense$",)),
    **dict.fromkeys(("t5", "mt5"), (r"\.DenseReluDense\.wo$",)),
}


def model_type(model):
    return getattr(getattr(model, "config", None), "model_type", None)


def resolve(model, table, fallback, what, variant):
    """The target regexes for this model, or AttachError listing the candidate layers."""
    names = table.get(model_type(model))
    if names is None and any(re.search(fallback[0], n) for n, _ in ll.linear_layers(model)):
        names = fallback
    if names is None:
        raise ll.AttachError(
            f"{variant} has no default placement for model type {model_type(model)!r} (known: "
            f"{', '.join(sorted(table))}): name its {what} with target_names=[...]. Linear-like "
            f"layers of this model: {ll.describe_candidates(model)}")
    return names


def key_value_names(model):
    return resolve(model, KEY_VALUE, _KV_PROJ, "key and value projections", "ia3")


def down_names(model):
    return resolve(model, DOWN, _DOWN_PROJ, "feed-forward down projection", "ia3_ff")
