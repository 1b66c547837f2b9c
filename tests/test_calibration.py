"""ll.stream_inputs: padding dropped with the mask of the sequence each layer reads."""
import torch

import lora_lite as ll
from lora_lite.testing.tiny_models import ARCHS


def rows_seen(model, targets, batch):
    seen = {}

    def on_rows(target, rows):
        seen[target.name] = seen.get(target.name, 0) + rows.shape[0]
    ll.stream_inputs(model, targets, [batch], on_rows)
    return seen


def test_encoder_decoder_sides_get_their_own_masks():
    arch = ARCHS["t5"]
    model = arch.build()
    batch = arch.batch(seq=8)
    batch["decoder_input_ids"] = batch["input_ids"][:, :8].clone()   # same length as the encoder
    enc_mask = batch["attention_mask"]
    assert enc_mask.sum() < enc_mask.numel()                        # the encoder side is padded
    cfg = ll.config("lora", r=2, target_names=[r"block\.0\.layer\.\d\.(SelfAttention|EncDecAttention)\.(q|k)$"])
    targets = ll.find_targets(model, cfg)
    seen = rows_seen(model, targets, batch)
    real, every = int(enc_mask.sum()), enc_mask.numel()
    assert seen["encoder.block.0.layer.0.SelfAttention.q"] == real
    assert seen["decoder.block.0.layer.0.SelfAttention.q"] == every    # no decoder mask: all rows
    assert seen["decoder.block.0.layer.1.EncDecAttention.q"] == every  # reads the decoder stream
    assert seen["decoder.block.0.layer.1.EncDecAttention.k"] == real   # reads the encoder output
    dec_mask = torch.ones_like(enc_mask)
    dec_mask[1, -3:] = 0
    seen = rows_seen(model, targets, {**batch, "decoder_attention_mask": dec_mask})
    assert seen["decoder.block.0.layer.0.SelfAttention.q"] == int(dec_mask.sum())
    assert seen["encoder.block.0.layer.0.SelfAttention.q"] == real


def test_decoder_only_models_keep_the_one_mask():
    arch = ARCHS["llama"]
    model, batch = arch.build(), arch.batch()
    targets = ll.find_targets(model, ll.config("lora", r=2, target_names=[r"layers\.0\.self_attn\.q_proj$"]))
    assert rows_seen(model, targets, batch) == {targets[0].name: int(batch["attention_mask"].sum())}
