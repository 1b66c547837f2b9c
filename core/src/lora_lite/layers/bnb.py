"""bitsandbytes Linear4bit (nf4/fp4) and Linear8bitLt: dequantized reads and requantized writes.

Registered through the ``register_weight_backends`` hook like any plugin's backend. bitsandbytes
is imported only when a model actually contains its layers.
"""
import sys

import torch

from ..plugins.hookspecs import hookimpl


def _bnb():
    return sys.modules.get("bitsandbytes")


def _is_bnb_layer(layer, class_name) -> bool:
    """``layer`` is a ``bitsandbytes.nn.<class_name>`` (False while bitsandbytes is not imported)."""
    bnb = _bnb()
    return bnb is not None and isinstance(layer, getattr(bnb.nn, class_name))


def _unpack_cpu_4bit(layer):
    """Undo bitsandbytes' AVX512-BF16 inference repacking (as its own state_dict() does)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    w = layer.weight
    if getattr(w.quant_state, "packing_format_for_cpu", False):
        w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)


class Bnb4bitBackend:
    name = "bitsandbytes-4bit"

    @staticmethod
    def handles(layer):
        return _is_bnb_layer(layer, "Linear4bit")

    @staticmethod
    def read(layer):
        from bitsandbytes.functional import dequantize_4bit
        _unpack_cpu_4bit(layer)
        w = layer.weight
        return dequantize_4bit(w.data, w.quant_state).float().reshape(layer.out_features, layer.in_features)

    @staticmethod
    def write(layer, dense):
        import bitsandbytes as bnb
        _unpack_cpu_4bit(layer)
        old = layer.weight
        qs = old.quant_state
        new = bnb.nn.Params4bit(
            dense.detach().to(qs.dtype).contiguous().cpu(), requires_grad=False,
            quant_type=qs.quant_type, blocksize=qs.blocksize,
            compress_statistics=old.compress_statistics, quant_storage=old.quant_storage,
            module=layer)
        layer.weight = new.to(old.device)

    @staticmethod
    def snapshot(layer):
        _unpack_cpu_4bit(layer)
        return layer.weight

    @staticmethod
    def restore(layer, snap):
        layer.weight = snap

    @staticmethod
    def guard_training(model):
        """Linear4bit's CPU inference path (eval + no_grad, AVX512-BF16) repacks the weight and
        runs a kernel with no autograd: a model evaluated between training steps then gets zero
        adapter gradients. Switch that path off while an adapter is attached."""
        bnb = _bnb()
        if bnb is None:
            return None
        saved = []
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                _unpack_cpu_4bit(module)
                saved.append((module, getattr(module, "support_avx512bf16_for_cpu", None)))
                module.support_avx512bf16_for_cpu = False

        def undo():
            for module, flag in saved:
                if flag is None:
                    if "support_avx512bf16_for_cpu" in vars(module):
                        del module.support_avx512bf16_for_cpu
                else:
                    module.support_avx512bf16_for_cpu = flag
        return undo


class Bnb8bitBackend:
    name = "bitsandbytes-8bit"

    @staticmethod
    def handles(layer):
        return _is_bnb_layer(layer, "Linear8bitLt")

    @staticmethod
    def read(layer):
        # Row-wise absmax int8: W = CB * SCB / 127. After a forward, bitsandbytes moves SCB from
        # the weight to layer.state; read whichever holds it and mutate nothing (PEFT's helper
        # drops SCB here and the layer's next forward fails).
        w = layer.weight
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = layer.state.SCB
        if w.dtype != torch.int8 or scb is None:
            return w.detach().float()  # not quantized yet (fp16 weights still on the host)
        return w.data.float() * (scb.float().unsqueeze(1) / 127.0)

    @staticmethod
    def write(layer, dense):
        import bitsandbytes as bnb
        old = layer.weight
        new = bnb.nn.Int8Params(dense.detach().float().contiguous().cpu(),
                                requires_grad=False, has_fp16_weights=False)
        layer.weight = new.to(old.device)
        layer.state.CB = None
        layer.state.SCB = None

    @staticmethod
    def snapshot(layer):
        return (layer.weight, layer.state.CB, layer.state.SCB)

    @staticmethod
    def restore(layer, snap):
        layer.weight, layer.state.CB, layer.state.SCB = snap


@hookimpl
def register_weight_backends(register):
    register(Bnb4bitBackend)
    register(Bnb8bitBackend)
