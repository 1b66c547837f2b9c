"""Layer kinds: the linear-like layer types lora-lite adapts, their shapes and their weight layout.

Every variant sees a target as ``d_in -> d_out`` with a dense fp32 weight of shape
``(d_out, d_in)`` (``ll.dense_weight``); the kind hides how the layer really stores it:

    kind                       shape from                weight storage
    nn.Linear (and subclasses) in_features/out_features  (d_out, d_in), float
    transformers' Conv1D       weight.shape = (nx, nf)   (d_in, d_out), float  (GPT-2, GPT-J...)
    bnb Linear4bit/Linear8bitLt in_features/out_features quantized, see lora_lite.bnb_backend

A kind (the hookspec calls it a weight backend) is an object with ``handles(layer) -> bool``,
``read(layer) -> fp32 (d_out, d_in)``, ``write(layer, dense)`` (stores a (d_out, d_in) tensor in
the layer's own layout and dtype), ``snapshot(layer)``/``restore(layer, snap)`` (bit-exact undo)
and optionally ``features(layer) -> (d_in, d_out)`` (default: ``in_features``/``out_features``)
and ``guard_training(model) -> undo``. Kinds registered through the ``register_weight_backends``
hook (bitsandbytes' among them) are asked first, then the built-in Conv1D and dense kinds.
"""
from __future__ import annotations

import torch
from torch import nn

from .plugins import weight_backends


def _float_matrix(w):
    return isinstance(w, torch.Tensor) and w.is_floating_point() and w.dim() == 2


class DenseKind:
    """nn.Linear & co: a floating ``.weight`` of shape (out_features, in_features)."""

    name = "dense"

    @staticmethod
    def handles(layer):
        w = getattr(layer, "weight", None)
        d_in, d_out = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
        return (_float_matrix(w) and isinstance(d_in, int) and isinstance(d_out, int)
                and tuple(w.shape) == (d_out, d_in))

    @staticmethod
    def features(layer):
        return int(layer.in_features), int(layer.out_features)

    @staticmethod
    def read(layer):
        return layer.weight.detach().float()

    @staticmethod
    def write(layer, dense):
        old = layer.weight
        layer.weight = nn.Parameter(dense.detach().to(old.dtype, copy=True), requires_grad=False)

    @staticmethod
    def snapshot(layer):
        return layer.weight  # write() replaces the Parameter, so the original object is intact

    @staticmethod
    def restore(layer, snap):
        layer.weight = snap


class Conv1DKind(DenseKind):
    """transformers' ``Conv1D`` (GPT-2's attention and MLP): y = x W + b, W stored (d_in, d_out)."""

    name = "conv1d"

    @staticmethod
    def handles(layer):
        w = getattr(layer, "weight", None)
        return (type(layer).__name__ == "Conv1D" and isinstance(getattr(layer, "nf", None), int)
                and _float_matrix(w) and w.shape[1] == layer.nf)

    @staticmethod
    def features(layer):
        d_in, d_out = layer.weight.shape
        return int(d_in), int(d_out)

    @staticmethod
    def read(layer):
        return layer.weight.detach().float().T.contiguous()  # (d_out, d_in)

    @staticmethod
    def write(layer, dense):
        old = layer.weight
        layer.weight = nn.Parameter(dense.detach().T.contiguous().to(old.dtype), requires_grad=False)


BUILT_IN_KINDS = (Conv1DKind, DenseKind)
UNQUANTIZED_KINDS = tuple(kind.name for kind in BUILT_IN_KINDS)  # float weights, exact writes


def kind_of(layer):
    """The kind that handles ``layer``, or None if lora-lite cannot adapt it."""
    for kind in weight_backends():
        if kind.handles(layer):
            return kind
    for kind in BUILT_IN_KINDS:
        if kind.handles(layer):
            return kind
    return None


def features(layer, kind=None) -> tuple[int, int]:
    """(d_in, d_out) of a linear-like layer, whatever its kind stores."""
    kind = kind or kind_of(layer)
    if kind is not None and callable(getattr(kind, "features", None)):
        return kind.features(layer)
    return int(layer.in_features), int(layer.out_features)


def is_linear_like(module) -> bool:
    """A layer some kind handles and whose (d_in, d_out) is known (so adapter shapes are)."""
    kind = kind_of(module)
    if kind is None or not callable(module):
        return False
    return callable(getattr(kind, "features", None)) or (
        hasattr(module, "in_features") and hasattr(module, "out_features"))
