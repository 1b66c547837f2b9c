"""One cell of the architecture matrix: a variant on a tiny model of one architecture.

    from lora_lite.testing.arch_matrix import run_cell, cell_problems
    figures = run_cell("gpt2", "myvariant", knobs={"r": 4})
    assert not cell_problems(figures, layers=None), figures

A cell attaches the variant with its default targets (or ``layers``) and measures: identity at
init, gradients only on adapter tensors (every trainable one gets one), one Adam step moves the
output, save -> load on a fresh base reproduces it (and so does ``ll.merge`` where the variant
merges), the loaded model survives
``.to(float64)`` and ``.to(bfloat16)``, detach puts the base back bit for bit. Where the
variant has no default placement on a model (attach refuses, naming the candidate layers),
``fallback_names`` are used. Models: ``lora_lite.testing.tiny_models`` (needs transformers).
"""
from __future__ import annotations

import copy
import os
import tempfile

import torch

from ..adapter_file import load, save
from ..attach import adapter_tensors, attach, attached, detach, trainable_parameters
from ..config import config
from ..errors import AttachError
from ..plugins import get_variant
from ..targets import find_targets, layer_index
from . import snapshot_state, state_equal
from .tiny_models import ARCHS

_BASES: dict = {}


def base(arch):
    """(model, batch, reference outputs) built once per architecture; callers deep-copy."""
    if arch not in _BASES:
        a = ARCHS[arch]
        model, batch = a.build(), a.batch()
        _BASES[arch] = (model, batch, a.outputs(model, batch))
    return _BASES[arch]


def tiny_config(variant, knobs=None, **kw):
    """r=4, alpha=8 (where the variant has them), then ``knobs``, then ``kw``."""
    fields = get_variant(variant).config.__dataclass_fields__
    values = {"r": 4, "alpha": 8, **(knobs or {}), **kw}
    return config(variant, **{k: v for k, v in values.items() if k in fields})


def calibration(variant, batch):
    return [batch] if get_variant(variant).needs_calibration else None


def scale(t):
    return max(1.0, t.abs().max().item())


def as_dtype(batch, dtype):
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


def unpadded(batch):
    """The batch with no padding: Gemma2's fp64 rows after left padding are NaN without adapters."""
    return {k: torch.ones_like(v) if k == "attention_mask" else v for k, v in batch.items()}


FALLBACK_NAMES = (r"layers\.\d+\.down$", r"layers\.\d+\.(mlp\.)?fc2$", r"layers\.\d+\.self_attn\.o_proj$")


def default_config(variant, model, layers=None, knobs=None, fallback_names=FALLBACK_NAMES):
    """The variant's default targets; where it has no placement for this model, attach must
    refuse with a message naming target_names and the model's layers; then ``fallback_names``."""
    cfg = tiny_config(variant, knobs, layers=layers)
    try:
        find_targets(model, cfg)
    except AttachError as e:
        if "target_names" not in str(e) or "layers.N" not in str(e):
            raise
        cfg = tiny_config(variant, knobs, layers=layers, target_names=list(fallback_names))
    return cfg


def run_cell(arch, variant, layers=None, knobs=None):
    """The figures of one cell (see the module docstring); ``cell_problems`` judges them."""
    a = ARCHS[arch]
    pristine, batch, ref = base(arch)
    model = copy.deepcopy(pristine)
    before = snapshot_state(model)
    cfg = default_config(variant, model, layers, knobs)
    out = {"blocks": sorted({layer_index(t.name) for t in find_targets(model, cfg)}, key=str)}
    attach(model, cfg, calibration_data=calibration(variant, batch))
    out["identity"] = ((a.outputs(model, batch) - ref).abs().max().item() / scale(ref))
    params = trainable_parameters(model)
    ids = {id(p) for p in params}
    model.train()
    a.loss(model, batch).backward()
    out["base_grads"] = [n for n, p in model.named_parameters() if p.grad is not None and id(p) not in ids]
    out["no_grad"] = [n for n, p in adapter_tensors(model).items() if id(p) in ids and p.grad is None]
    out["grad_norm"] = sum(p.grad.norm().item() for p in params if p.grad is not None)
    torch.optim.Adam(params, lr=1e-2).step()
    model.eval()
    trained = a.outputs(model, batch)
    out["moved"] = (trained - ref).abs().max().item()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "a.safetensors")
        save(model, path)
        fresh = copy.deepcopy(pristine)
        load(fresh, path)
        out["merge"] = merge_error(pristine, path, a, batch, trained)
    out["reload"] = (a.outputs(fresh, batch) - trained).abs().max().item() / scale(trained)
    full = unpadded(batch)
    trained_full = a.outputs(fresh, full)
    for dtype in (torch.float64, torch.bfloat16):
        fresh.to(dtype)
        moved = a.outputs(fresh, as_dtype(full, dtype))
        out[str(dtype)[6:]] = (moved - trained_full).abs().max().item() / scale(trained_full)
    detach(model)
    out["detach_bitexact"] = state_equal(snapshot_state(model), before)
    out["detach_exact_outputs"] = torch.equal(a.outputs(model, batch), ref)
    return out


def merge_error(pristine, path, arch, batch, trained):
    """Relative output error of ``ll.merge`` on a fresh base loaded from ``path``; None when the
    variant cannot merge (mergeable = False or no merged_weight)."""
    from ..merge import merge, merge_refusal
    model = copy.deepcopy(pristine)
    load(model, path)
    state = attached(model)
    assert state is not None, "load attached the adapter"
    if merge_refusal(state.variant) is not None:
        return None
    merge(model)
    return (arch.outputs(model, batch) - trained).abs().max().item() / scale(trained)


def cell_problems(m, layers=None) -> list[str]:
    """The invariants a cell's figures break (empty: the cell holds)."""
    blocks = set(m["blocks"])
    checks = {
        "layers": blocks == {0} if layers else {0, 1} <= blocks <= {0, 1, None},
        "identity < 1e-5": m["identity"] < 1e-5,          # exact for most; SVD crops ~1e-7
        "no base gradient": m["base_grads"] == [],
        "every trainable adapter tensor gets a gradient": m["no_grad"] == [],
        "training moves the output": m["grad_norm"] > 0 and m["moved"] > 0,
        "reload < 1e-5": m["reload"] < 1e-5,
        "merge < 1e-4": m.get("merge") is None or m["merge"] < 1e-4,
        "float64 after attach < 1e-4": m["float64"] < 1e-4,
        "bfloat16 after attach < 0.2": m["bfloat16"] < 0.2,  # ~3 digits; finite and close
        "detach bit-exact": m["detach_bitexact"] and m["detach_exact_outputs"],
    }
    return [name for name, ok in checks.items() if not ok]


def placement(arch, variant) -> dict:
    """What ``variant``'s default targets adapt on tiny ``arch``, and what they leave out, as
    measured on the model: {"adapted": distinct layer leaf names in model order, "layers":
    count, "left_out": {"output head", "embeddings", "convolutions", "fused experts" (modules
    holding 3-D parameters), "other linear": counts}} (docs/models.md's table)."""
    import re

    from torch import nn

    from ..layers.kinds import kind_family
    from ..targets import linear_layers, output_head_ids
    model = ARCHS[arch].build()
    found = find_targets(model, tiny_config(variant))
    picked = {id(t.layer) for t in found}
    leaves = list(dict.fromkeys(re.sub(r"^.*?\.(\d+\.)+|^", "", t.name).rsplit(".", 1)[-1]
                                for t in found))
    heads = output_head_ids(model)
    modules = list(model.modules())
    left = {
        "output head": sum(id(m) in heads and id(m) not in picked for m in modules),
        "embeddings": sum(isinstance(m, nn.Embedding) and id(m) not in picked for m in modules),
        "convolutions": sum(kind_family(m) == "conv" or isinstance(m, (nn.Conv1d, nn.Conv2d))
                            for m in modules if id(m) not in picked),
        "fused experts": sum(is_fused_experts(m) for m in modules),
        "other linear": sum(id(m) not in picked and id(m) not in heads
                            for _, m in linear_layers(model)),
    }
    return {"adapted": leaves, "layers": len(found), "left_out": {k: v for k, v in left.items() if v}}


def is_fused_experts(module) -> bool:
    """A module holding experts as one 3-D parameter (E, ., .), E > 1 (not a conv kernel)."""
    from torch import nn
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return False
    return any(p.dim() == 3 and p.shape[0] > 1 for p in module.parameters(recurse=False))
