"""Running calibration data through a model and streaming each target layer's inputs.

For data-driven inits (EVA, antipasto's direction re-selection). Inputs are delivered batch by
batch, as fp32 (N, d_in) rows with padding positions removed, so a variant can accumulate
statistics without holding every activation in memory.
"""
from __future__ import annotations

import torch


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
    """
    current_mask = {}

    def capture(target):
        def hook(layer, args):
            x = args[0].detach()
            rows = x.reshape(-1, x.shape[-1]).float()
            mask = current_mask.get("mask")
            if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
                rows = rows[mask.reshape(-1).to(rows.device).bool()]
            if rows.shape[0]:
                on_rows(target, rows)
        return hook

    handles = [t.layer.register_forward_pre_hook(capture(t), prepend=True) for t in targets]
    was_training = model.training
    batches = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in calibration_data:
                current_mask["mask"] = batch.get("attention_mask") if isinstance(batch, dict) else None
                call_model(model, batch)
                batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if batches == 0:
        raise ValueError("calibration_data is empty: pass at least one batch")
    return batches
