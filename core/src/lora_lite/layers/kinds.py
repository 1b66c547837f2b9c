"""Layer kinds: the linear-like layer types lora-lite adapts, their shapes and their weight layout.

Every variant sees a target as ``d_in -> d_out`` with a dense fp32 weight of shape
``(d_out, d_in)`` (``ll.dense_weight``); the kind hides how the layer really stores it:

    kind                       shape from                weight storage
    nn.Linear (and subclasses) in_features/out_features  (d_out, d_in), float
    transformers' Conv1D       weight.shape = (nx, nf)   (d_in, d_out), float  (GPT-2, GPT-J...)
    bnb Linear4bit/Linear8bitLt in_features/out_features quantized, see lora_lite.layers.bnb

A kind (the hookspec calls it a weight backend) is an object with ``handles(layer) -> bool``,
``read(layer) -> fp32 (d_out, d_in)``, ``write(layer, dense)`` (stores a (d_out, d_in) tensor in
the layer's own layout and dtype), ``snapshot(layer)``/``restore(layer, snap)`` (bit-exact undo)
and optionally ``features(layer) -> (d_in, d_out)`` (default: ``in_features``/``out_features``)
and ``guard_training(model) -> undo``. Kinds registered through the ``register_weight_backends``
hook (bitsandbytes' among them) are asked first, then the built-in Conv1D and dense kinds.

Beyond the linear family, two built-in kinds PEFT's LoRA also adapts, seen in the same way:

    kind            d_in -> d_out                       dense (d_out, d_in) view
    nn.Embedding    num_embeddings -> embedding_dim     weight.T
    nn.Conv1d/2d/3d in_channels*prod(kernel) -> out     weight.view(out, -1)   (groups=1, zeros padding)

A kind's ``family`` ("linear" unless it says otherwise; "embedding", "conv") is what a variant's
``layer_kinds`` flag lists (default ``("linear",)``: attach refuses other targets in one line).
A variant written on ``project_in(layer, x, A)`` (x Aᵀ; an embedding lookup of Aᵀ; a conv with A
as the kernel and the layer's stride/padding/dilation) and ``project_out(layer, h, B)`` (h Bᵀ on
the feature / channel dimension) works on every family. The default targets ("all-linear")
are the linear family only; embeddings and convolutions are adapted when target_names name them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AttachError
from ..plugins import weight_backends


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


class EmbeddingKind(DenseKind):
    """nn.Embedding: a lookup is onehot(x) Wᵀ, so the dense (d_out, d_in) view is weight.T."""

    name = family = "embedding"

    @staticmethod
    def handles(layer):
        return isinstance(layer, nn.Embedding) and _float_matrix(layer.weight)

    @staticmethod
    def features(layer):
        return int(layer.num_embeddings), int(layer.embedding_dim)

    @staticmethod
    def read(layer):
        return layer.weight.detach().float().T.contiguous()

    @staticmethod
    def write(layer, dense):
        old = layer.weight
        layer.weight = nn.Parameter(dense.detach().T.contiguous().to(old.dtype), requires_grad=False)


class ConvKind(DenseKind):
    """nn.Conv1d/2d/3d (groups=1, zero padding): a conv is a matmul of the (out, in*prod(kernel))
    weight with the input's patches, so that is the dense (d_out, d_in) view."""

    name = family = "conv"

    @staticmethod
    def handles(layer):
        return (isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and layer.groups == 1
                and layer.padding_mode == "zeros" and layer.weight.is_floating_point())

    @staticmethod
    def features(layer):
        return int(layer.in_channels * math.prod(layer.kernel_size)), int(layer.out_channels)

    @staticmethod
    def read(layer):
        return layer.weight.detach().float().reshape(layer.out_channels, -1)

    @staticmethod
    def write(layer, dense):
        old = layer.weight
        layer.weight = nn.Parameter(dense.detach().reshape(old.shape).to(old.dtype, copy=True),
                                    requires_grad=False)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _math_family(layer) -> str:
    """kind_family without asking the plugin kinds for the common types (the hooks call this
    on every forward: nn.Linear, bnb's subclasses of it, Conv1D, nn.Embedding, nn.Conv*)."""
    if isinstance(layer, nn.Embedding):
        return "embedding"
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(layer, nn.Linear) or type(layer).__name__ == "Conv1D":
        return "linear"
    return kind_family(layer)


def project_in(layer, x, A):
    """The layer's own operation with ``A`` (r, d_in) as its weight, no bias: x Aᵀ (linear
    family), F.embedding(x, Aᵀ) (embedding, the layer's padding_idx and max_norm), a conv with A
    as an (r, in, *kernel) kernel and the layer's stride/padding/dilation (conv): (..., r) or
    (batch, r, *spatial)."""
    family = _math_family(layer)
    if family == "embedding":
        return F.embedding(x, A.T, padding_idx=layer.padding_idx, max_norm=layer.max_norm,
                           norm_type=layer.norm_type, scale_grad_by_freq=layer.scale_grad_by_freq,
                           sparse=layer.sparse)
    if family == "conv":
        kernel = A.reshape(A.shape[0], layer.in_channels, *layer.kernel_size)
        return _CONV[len(layer.kernel_size)](x, kernel, None, layer.stride, layer.padding,
                                             layer.dilation)
    return x @ A.T


def project_out(layer, h, B):
    """``B`` (d_out, r) applied on the feature dimension of ``project_in``'s result: h Bᵀ, or a
    1x1 conv (the channel dimension, dim 1) for the conv family."""
    if _math_family(layer) == "conv":
        return torch.einsum("or,br...->bo...", B, h)
    return h @ B.T


def project_out_add(layer, h, B, y, scale: float):
    """``y + scale · project_out(layer, h, B)`` in y's dtype; on linear and embedding layers, when
    the dtypes agree, one fused addmm (no delta or scaled-delta temporaries)."""
    if _math_family(layer) != "conv" and h.dtype == y.dtype == B.dtype:
        flat = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), B.T, alpha=scale)
        return flat.view(y.shape)
    return y + scale * project_out(layer, h, B).to(y.dtype)


def kind_family(layer) -> str:
    """"linear", "embedding" or "conv" (a plugin kind is "linear" unless it says otherwise)."""
    kind = kind_of(layer)
    return getattr(kind, "family", "linear") if kind is not None else "linear"


def check_layer_kinds(variant, targets):
    """Refuse, in one line naming the layer and its kind, a target the variant cannot handle
    (its ``layer_kinds`` flag, default ("linear",))."""
    allowed = tuple(variant.layer_kinds)
    for t in targets:
        family = kind_family(t.layer)
        if family not in allowed:
            raise AttachError(
                f"variant {variant.name!r} cannot adapt {t.name} ({type(t.layer).__name__}, layer "
                f"kind {family!r}): it handles {', '.join(allowed)} layers; leave it out of "
                "target_names, or pick a variant whose layer_kinds include it")


BUILT_IN_KINDS = (Conv1DKind, DenseKind, EmbeddingKind, ConvKind)
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


def is_adaptable(module) -> bool:
    """A layer some kind handles (any family) and whose (d_in, d_out) is known."""
    kind = kind_of(module)
    if kind is None or not callable(module):
        return False
    return callable(getattr(kind, "features", None)) or (
        hasattr(module, "in_features") and hasattr(module, "out_features"))


def is_linear_like(module) -> bool:
    """An adaptable layer of the linear family (the "all-linear" default targets)."""
    return is_adaptable(module) and kind_family(module) == "linear"
