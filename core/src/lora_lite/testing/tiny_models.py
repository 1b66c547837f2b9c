"""Tiny random models of 21 architectures (decoders, MoE decoders, encoders, seq2seq, vision, audio), built from
transformers configs (no download), for tests.

    from lora_lite.testing.tiny_models import ARCHS, build
    model, batch = build("gpt2")               # fp32, eval mode, 2 blocks, width 32
    out = ARCHS["gpt2"].outputs(model, batch)  # logits (fp32)
    loss = ARCHS["gpt2"].loss(model, batch)

Every model has 2 transformer blocks (so ``layers=[0]`` has something to leave out) and width
32; the plain MLP keeps its blocks in ``layers`` like a transformer. The MoE models (Qwen3-MoE,
Mixtral, OLMoE, GPT-OSS) have 4 routed experts stored as fused 3-D parameters
(``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``), 2 per token, none of them square
(so an orientation mix-up shows): Qwen3-MoE (4, 48, 32) / (4, 32, 24), Mixtral and OLMoE
(4, 128, 32) / (4, 32, 64), GPT-OSS (E, in, out): (4, 32, 128) / (4, 64, 32), with biases.
They run transformers' "eager" experts loop (its grouped_mm kernel refuses float64 on CPU). ViT (image classes) and
CLIP (image-text) take 16x16 images through a Conv2d patch embedding; Whisper takes 16 mel bins
through two Conv1d. Also as functions: ``tiny_qwen3_moe()``, ``tiny_mixtral()``, ``tiny_olmoe()``,
``tiny_gpt_oss()``, ``tiny_gemma3()``, ``tiny_vit()``, ``tiny_clip()``, ``tiny_whisper()``
(each returns ``(model, batch)``). Needs ``transformers``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

WIDTH, FF, LAYERS, HEADS, KV_HEADS, VOCAB, MELS, IMAGE = 32, 64, 2, 4, 2, 128, 16, 16


def _decoder(config_name, model_name, experts=None, **kw):
    def make():
        import transformers
        config = getattr(transformers, config_name)(**kw)
        if experts:  # the grouped_mm kernel refuses float64 on CPU; "eager" loops the experts
            config._experts_implementation = experts
        return getattr(transformers, model_name)(config)
    return make


_LLAMA_LIKE = dict(hidden_size=WIDTH, intermediate_size=FF, num_hidden_layers=LAYERS,
                   num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
                   max_position_embeddings=64)

BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "llama": _decoder("LlamaConfig", "LlamaForCausalLM", **_LLAMA_LIKE, tie_word_embeddings=False),
    "qwen2": _decoder("Qwen2Config", "Qwen2ForCausalLM", **_LLAMA_LIKE, tie_word_embeddings=True),
    "qwen3": _decoder("Qwen3Config", "Qwen3ForCausalLM", **_LLAMA_LIKE, head_dim=8,
                      tie_word_embeddings=True),
    "mistral": _decoder("MistralConfig", "MistralForCausalLM", **_LLAMA_LIKE, sliding_window=None),
    "gemma2": _decoder("Gemma2Config", "Gemma2ForCausalLM", **_LLAMA_LIKE, head_dim=8,
                       query_pre_attn_scalar=8, sliding_window=16),
    "phi3": _decoder("Phi3Config", "Phi3ForCausalLM", **_LLAMA_LIKE, pad_token_id=0,
                     bos_token_id=1, eos_token_id=2),
    "gpt_neox": _decoder("GPTNeoXConfig", "GPTNeoXForCausalLM", hidden_size=WIDTH,
                         intermediate_size=FF, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         vocab_size=VOCAB, max_position_embeddings=64),
    "falcon": _decoder("FalconConfig", "FalconForCausalLM", hidden_size=WIDTH,
                       num_hidden_layers=LAYERS, num_attention_heads=HEADS, vocab_size=VOCAB),
    "opt": _decoder("OPTConfig", "OPTForCausalLM", hidden_size=WIDTH, ffn_dim=FF,
                    num_hidden_layers=LAYERS, num_attention_heads=HEADS, vocab_size=VOCAB,
                    word_embed_proj_dim=WIDTH, max_position_embeddings=64),
    "bert": _decoder("BertConfig", "BertForMaskedLM", hidden_size=WIDTH, intermediate_size=FF,
                     num_hidden_layers=LAYERS, num_attention_heads=HEADS, vocab_size=VOCAB,
                     max_position_embeddings=64),
    "t5": _decoder("T5Config", "T5ForConditionalGeneration", d_model=WIDTH, d_kv=8, d_ff=FF,
                   num_layers=LAYERS, num_decoder_layers=LAYERS, num_heads=HEADS,
                   vocab_size=VOCAB, relative_attention_num_buckets=8, decoder_start_token_id=0),
    "gpt2": _decoder("GPT2Config", "GPT2LMHeadModel", n_embd=WIDTH, n_layer=LAYERS,
                     n_head=HEADS, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
                     eos_token_id=0),
}


class MLPBlock(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class PlainMLP(nn.Module):
    """A residual MLP with no config: blocks in ``layers``, a ``head`` named like nothing known."""

    def __init__(self, width=WIDTH, hidden=FF, blocks=LAYERS, out=8):
        super().__init__()
        self.inp = nn.Linear(12, width)
        self.layers = nn.ModuleList(MLPBlock(width, hidden) for _ in range(blocks))
        self.head = nn.Linear(width, out)

    def forward(self, x):
        h = self.inp(x)
        for block in self.layers:
            h = block(h)
        return self.head(h)


BUILDERS["mlp"] = PlainMLP

_MOE = dict(_LLAMA_LIKE, num_experts_per_tok=2, tie_word_embeddings=False, experts="eager")
BUILDERS.update({
    "qwen3_moe": _decoder("Qwen3MoeConfig", "Qwen3MoeForCausalLM", **_MOE, head_dim=8,
                          num_experts=4, moe_intermediate_size=24, decoder_sparse_step=1,
                          mlp_only_layers=[]),
    "mixtral": _decoder("MixtralConfig", "MixtralForCausalLM", **_MOE, num_local_experts=4,
                        sliding_window=None),
    "olmoe": _decoder("OlmoeConfig", "OlmoeForCausalLM", **_MOE, num_experts=4,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt_oss": _decoder("GptOssConfig", "GptOssForCausalLM", **_MOE, num_local_experts=4,
                        head_dim=8, sliding_window=16,
                        rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    "gemma3": _decoder("Gemma3TextConfig", "Gemma3ForCausalLM", **_LLAMA_LIKE, head_dim=8,
                       query_pre_attn_scalar=8, sliding_window=16),
    "vit": _decoder("ViTConfig", "ViTForImageClassification", hidden_size=WIDTH,
                    intermediate_size=FF, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                    image_size=16, patch_size=4, num_channels=3, num_labels=8),
    "clip": _decoder("CLIPConfig", "CLIPModel", projection_dim=16, text_config=dict(
        hidden_size=WIDTH, intermediate_size=FF, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1, eos_token_id=2),
        vision_config=dict(
        hidden_size=WIDTH, intermediate_size=FF, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        image_size=16, patch_size=4)),
    "whisper": _decoder("WhisperConfig", "WhisperForConditionalGeneration", d_model=WIDTH,
                        encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=HEADS,
                        decoder_attention_heads=HEADS, encoder_ffn_dim=FF, decoder_ffn_dim=FF,
                        vocab_size=VOCAB, num_mel_bins=MELS, max_source_positions=8,
                        max_target_positions=16, decoder_start_token_id=1, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, suppress_tokens=None,
                        begin_suppress_tokens=None),
})
KINDS = {"t5": "seq2seq", "bert": "masked", "mlp": "mlp", "vit": "image", "clip": "image_text",
         "whisper": "speech"}
MOE = ("qwen3_moe", "mixtral", "olmoe", "gpt_oss")


@dataclass
class Arch:
    name: str

    @property
    def kind(self):
        return KINDS.get(self.name, "causal")

    def build(self, seed=0) -> nn.Module:
        torch.manual_seed(seed)
        return BUILDERS[self.name]().eval()

    def batch(self, seed=0, batch=None, seq=8, pad_first=2) -> dict:
        """Two rows; four for the image kinds, whose pooled heads see one row per example (the
        calibrated variants need r=4 rows there)."""
        g = torch.Generator().manual_seed(seed)
        batch = batch or (4 if self.kind in ("image", "image_text") else 2)
        if self.kind == "mlp":
            return {"x": torch.randn(batch, seq, 12, generator=g)}
        if self.kind == "image":
            return {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=g)}
        if self.kind == "speech":  # 16 frames: the conv stem halves them to max_source_positions
            return {"input_features": torch.randn(batch, MELS, 16, generator=g),
                    "decoder_input_ids": torch.randint(3, VOCAB, (batch, seq - 2), generator=g)}
        ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, :pad_first] = 0
        out = {"input_ids": ids, "attention_mask": mask}
        if self.kind == "image_text":
            out["pixel_values"] = torch.randn(batch, 3, IMAGE, IMAGE, generator=g)
        if self.kind == "seq2seq":
            out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, seq - 2), generator=g)
        return out

    def outputs(self, model, batch) -> torch.Tensor:
        with torch.no_grad():
            out = model(**batch)
        if self.kind == "mlp":
            return out.float()
        return (out.logits_per_image if self.kind == "image_text" else out.logits).float()

    def loss(self, model, batch) -> torch.Tensor:
        if self.kind == "mlp":
            return model(**batch).pow(2).mean()
        if self.kind == "image_text":
            return model(**batch, return_loss=True).loss
        if self.kind == "image":
            return model(**batch, labels=torch.arange(len(batch["pixel_values"])) % 8).loss
        labels = batch["decoder_input_ids"] if self.kind in ("seq2seq", "speech") else batch["input_ids"]
        return model(**batch, labels=labels).loss


ARCHS = {name: Arch(name) for name in BUILDERS}


def build(name, seed=0):
    """(model, batch) of architecture ``name`` (one of ARCHS)."""
    arch = ARCHS[name]
    return arch.build(seed), arch.batch(seed)


def tiny_qwen3_moe(seed=0):
    return build("qwen3_moe", seed)


def tiny_mixtral(seed=0):
    return build("mixtral", seed)


def tiny_olmoe(seed=0):
    return build("olmoe", seed)


def tiny_gpt_oss(seed=0):
    return build("gpt_oss", seed)


def tiny_gemma3(seed=0):
    return build("gemma3", seed)


def tiny_vit(seed=0):
    return build("vit", seed)


def tiny_clip(seed=0):
    return build("clip", seed)


def tiny_whisper(seed=0):
    return build("whisper", seed)
