"""Quantize a model's nn.Linear layers in place with bitsandbytes (4bit nf4/fp4 or 8bit LLM.int8).

For models that were not loaded quantized (a GGUF file, a model built from a config). Needs
``bitsandbytes``, which is not a runtime dependency of core: it is imported on first use.
"""
from __future__ import annotations

import torch
from torch import nn


def quantize_model(model, kind: str, skip=("lm_head",)):
    """Replace the nn.Linear layers of ``model`` (in place) with bitsandbytes ones.

    kind: "4bit" (nf4, fp32 compute), "fp4" or "8bit" (LLM.int8, threshold 0). Quantization
    happens on the CPU, as bitsandbytes 0.50 supports.
    """
    import bitsandbytes as bnb
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is not nn.Linear or any(s in full for s in skip):
                continue
            w = child.weight.data.clone()
            new: nn.Module
            has_bias = child.bias is not None
            if kind in ("4bit", "nf4", "fp4"):
                qtype = "fp4" if kind == "fp4" else "nf4"
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=has_bias,
                                        compute_dtype=torch.float32, quant_type=qtype)
                new.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=qtype)
            elif kind == "8bit":
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=has_bias,
                                          has_fp16_weights=False, threshold=0.0)
                new.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
            else:
                raise ValueError(f"kind must be '4bit', 'fp4' or '8bit', not {kind!r}")
            if has_bias:
                new.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(module, child_name, new.to(child.weight.device))
    return model.eval()
