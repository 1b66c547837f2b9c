"""Tiny random models of 13 architectures, built from transformers configs (no download), for tests.

    from lora_lite.tiny_models import ARCHS, build
    model, batch = build("gpt2")               # fp32, eval mode, 2 blocks, width 32
    out = ARCHS["gpt2"].outputs(model, batch)  # logits (fp32)
    loss = ARCHS["gpt2"].loss(model, batch)

Every model has 2 transformer blocks (so ``layers=[0]`` has something to leave out) and width
32; the plain MLP keeps its blocks in ``layers`` like a transformer. Needs ``transformers``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

WIDTH, FF, LAYERS, HEADS, KV_HEADS, VOCAB = 32, 64, 2, 4, 2, 128


def _decoder(config_name, model_name, **kw):
    def make():
        import transformers
        config = getattr(transformers, config_name)(**kw)
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


@dataclass
class Arch:
    name: str

    @property
    def kind(self):
        return {"t5": "seq2seq", "bert": "masked", "mlp": "mlp"}.get(self.name, "causal")

    def build(self, seed=0) -> nn.Module:
        torch.manual_seed(seed)
        return BUILDERS[self.name]().eval()

    def batch(self, seed=0, batch=2, seq=8, pad_first=2) -> dict:
        g = torch.Generator().manual_seed(seed)
        if self.kind == "mlp":
            return {"x": torch.randn(batch, seq, 12, generator=g)}
        ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, :pad_first] = 0
        out = {"input_ids": ids, "attention_mask": mask}
        if self.kind == "seq2seq":
            out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, seq - 2), generator=g)
        return out

    def outputs(self, model, batch) -> torch.Tensor:
        with torch.no_grad():
            out = model(**batch)
        return (out if self.kind == "mlp" else out.logits).float()

    def loss(self, model, batch) -> torch.Tensor:
        if self.kind == "mlp":
            return model(**batch).pow(2).mean()
        labels = batch["decoder_input_ids"] if self.kind == "seq2seq" else batch["input_ids"]
        return model(**batch, labels=labels).loss


ARCHS = {name: Arch(name) for name in BUILDERS}


def build(name, seed=0):
    """(model, batch) of architecture ``name`` (one of ARCHS)."""
    arch = ARCHS[name]
    return arch.build(seed), arch.batch(seed)
