"""Dense-weight access for any supported layer kind: read the fp32 weight, write a new one back.

``dense_weight`` is always fp32 (d_out, d_in) and ``set_dense_weight`` takes that shape, whatever
the layer stores: nn.Linear, transformers' Conv1D (stored transposed), bitsandbytes 4bit/8bit
(dequantized / requantized), or a kind a plugin registers (see ``lora_lite.layers.kinds``).
The first write to a layer keeps a snapshot of the original storage so that
``restore_base_weight`` (called by ``detach``) puts it back bit for bit.
"""
from __future__ import annotations

import torch

from .kinds import DenseKind, features, kind_of

_SNAPSHOT = "_lora_lite_base_snapshot"
_STATE_HOOK = "_lora_lite_state_dict_hook"


def __getattr__(attr):
    """``DenseBackend``, the former name of ``DenseKind``: importable for one release, with a warning."""
    if attr == "DenseBackend":
        import warnings
        warnings.warn("lora_lite.layers.weights.DenseBackend is now DenseKind (lora_lite.layers.kinds)",
                      DeprecationWarning, stacklevel=2)
        return DenseKind
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def backend_for(layer):
    kind = kind_of(layer)
    if kind is None:
        raise TypeError(
            f"lora-lite cannot read the weight of {type(layer).__module__}.{type(layer).__name__}: "
            "no layer kind handles this layer type. Supported: nn.Linear, transformers' Conv1D, "
            "bitsandbytes Linear4bit and Linear8bitLt; plugins can add others through the "
            "register_weight_backends hook (see lora_lite.layers.kinds).")
    return kind


def dense_weight(layer) -> torch.Tensor:
    """The layer's current weight as a dense fp32 (d_out, d_in) tensor (dequantized if needed)."""
    return backend_for(layer).read(layer)


def set_dense_weight(layer, dense: torch.Tensor) -> None:
    """Replace the layer's weight with ``dense`` (requantized for quantized layers).

    The original storage is kept so that ``detach`` restores it bit for bit.
    """
    backend = backend_for(layer)
    d_in, d_out = features(layer, backend)
    if tuple(dense.shape) != (d_out, d_in):
        raise ValueError(f"new weight has shape {tuple(dense.shape)}, layer needs {(d_out, d_in)}")
    if not hasattr(layer, _SNAPSHOT):
        setattr(layer, _SNAPSHOT, (backend, backend.snapshot(layer), backend.read(layer)))
        setattr(layer, _STATE_HOOK, layer._register_state_dict_hook(_show_original_weight))
    backend.write(layer, dense)


def base_dense_weight(layer) -> torch.Tensor:
    """The fp32 weight the layer had before any ``set_dense_weight`` (its current one otherwise)."""
    snap = getattr(layer, _SNAPSHOT, None)
    return snap[2].clone() if snap is not None else dense_weight(layer)


def weight_was_rewritten(layer) -> bool:
    return hasattr(layer, _SNAPSHOT)


def restore_base_weight(layer) -> None:
    """Undo every ``set_dense_weight`` on this layer (no-op if none happened)."""
    snap = getattr(layer, _SNAPSHOT, None)
    if snap is not None:
        backend, saved, _ = snap
        backend.restore(layer, saved)
        forget_base_weight(layer)


def forget_base_weight(layer) -> None:
    """Drop the snapshot (and its state-dict hook): the current weight becomes the base (merge)."""
    if hasattr(layer, _STATE_HOOK):
        getattr(layer, _STATE_HOOK).remove()
        delattr(layer, _STATE_HOOK)
    if hasattr(layer, _SNAPSHOT):
        delattr(layer, _SNAPSHOT)


def _show_original_weight(layer, state_dict, prefix, local_metadata):
    """State-dict hook of a rewritten layer: its base entries (weight and, on bitsandbytes, the
    quantization state) are those of the original weight, so ``state_dict()`` and
    ``save_pretrained`` never carry a rewritten base. Adapter (``lora_*``) entries are kept."""
    backend, saved, _ = getattr(layer, _SNAPSHOT)
    current = backend.snapshot(layer)
    backend.restore(layer, saved)
    try:
        original = {}
        layer._save_to_state_dict(original, prefix, keep_vars=False)
    finally:
        backend.restore(layer, current)
    for key in [k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]]:
        if not key[len(prefix):].startswith("lora_") and key not in original:
            del state_dict[key]
    state_dict.update({k: v for k, v in original.items() if not k[len(prefix):].startswith("lora_")})
    return state_dict


def guard_training(model):
    """Let each backend make its layers safe to train adapters through; returns an undo function."""
    from ..plugins import weight_backends
    undos = [b.guard_training(model) for b in weight_backends() if hasattr(b, "guard_training")]

    def undo():
        for fn in reversed(undos):
            if fn is not None:
                fn()
    return undo
