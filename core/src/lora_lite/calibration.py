"""Running calibration data through a model and streaming each target layer's inputs.

For data-driven inits (EVA, antipasto's direction re-selection). Inputs are delivered batch by
batch, as fp32 (N, d_in) rows with padding positions removed, so a variant can accumulate
statistics without holding every activation in memory.
"""
from __future__ import annotations

import torch

from .errors import CalibrationError


def call_model(model, batch):
    """Run ``model`` on one calibration batch: dict -> model(**b), tuple/list -> model(*b)."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def stream_inputs(model, targets, calibration_data, on_rows):
    """For each batch, call ``on_rows(target, rows)`` with the non-padding inputs of every target.

    rows: fp32 tensor (N, d_in), on the layer's device. Inputs are captured before any adapter
    pre-hook runs. The model runs in eval mode under no_grad; its training mode is restored.
    Padding is dropped with the mask of the sequence a layer reads: on encoder-decoder models
    (``config.is_encoder_decoder``) decoder layers use ``decoder_attention_mask`` (all positions
    when the batch has none), encoder layers and the decoder's cross-attention projections that
    read the encoder output use ``attention_mask``.
    """
    masks = {}
    sides = _Sides(model)

    def capture(target):
        def hook(layer, args):
            x = args[0].detach()
            rows = x.reshape(-1, x.shape[-1]).float()
            mask = masks.get(sides.side_of(target.layer, x))
            if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
                rows = rows[mask.reshape(-1).to(rows.device).bool()]
            if rows.shape[0]:
                on_rows(target, rows)
        return hook

    handles = [t.layer.register_forward_pre_hook(capture(t), prepend=True) for t in targets]
    handles += sides.hooks()
    was_training = model.training
    batches = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in calibration_data:
                is_dict = isinstance(batch, dict)
                masks["encoder"] = batch.get("attention_mask") if is_dict else None
                masks["decoder"] = batch.get("decoder_attention_mask") if is_dict else None
                call_model(model, batch)
                batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        sides.encoder_output = None
    if batches == 0:
        raise CalibrationError("calibration_data is empty: pass at least one batch")
    return batches


class _Sides:
    """Which sequence a layer reads: "encoder" (the only side of other models) or "decoder"."""

    def __init__(self, model):
        self.encoder = self.decoder = self.encoder_output = None
        config = getattr(model, "config", None)
        if getattr(config, "is_encoder_decoder", False) and callable(getattr(model, "get_decoder", None)):
            self.encoder, self.decoder = model.get_encoder(), model.get_decoder()
        self.decoder_modules = {id(m) for m in self.decoder.modules()} if self.decoder else set()

    def hooks(self):
        if self.encoder is None:
            return []

        def keep_output(module, args, out):
            hidden = out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", out)
            self.encoder_output = hidden if isinstance(hidden, torch.Tensor) else None
        return [self.encoder.register_forward_hook(keep_output)]

    def side_of(self, layer, x):
        if id(layer) not in self.decoder_modules:
            return "encoder"
        enc = self.encoder_output
        if enc is not None and x.shape == enc.shape and x.data_ptr() == enc.data_ptr():
            return "encoder"  # cross-attention key/value projection: reads the encoder output
        return "decoder"
