"""nn.MultiheadAttention as a target (layer kind ``multihead_attention``), as PEFT's LoRA does it.

torch's ``F.multi_head_attention_forward`` reads the module's packed ``in_proj_weight`` (3E, E)
and ``out_proj.weight`` (E, E) itself and never calls ``out_proj.forward``, so there is no
linear call to hook. A ``target_names`` regex that selects an nn.MultiheadAttention module makes
both weights parameter targets (``lora_lite.param_targets``): a forward pre-hook on the
attention module puts W' = the variant's weight-space form (``param_delta`` / ``merged_weight``)
in place of each weight for the duration of the call, and takes it away after. Like PEFT, both
projections are adapted together (``in_proj_weight`` as one (3E, E) layer, PEFT's
``lora_A``/``lora_B`` on the module; ``out_proj.weight`` as PEFT's ``base_layer.out_proj``).

Refused in one line naming the layer and the kind: an attention with separate q/k/v weights
(``kdim``/``vdim`` other than ``embed_dim``: PEFT refuses those too), an ``out_proj`` that is no
nn.Linear, a variant with no weight-space form or one that initialises from the weight or from
data, and a name that selects only ``<attention>.out_proj`` (its forward never runs). The
default targets (all-linear) leave nn.MultiheadAttention alone.
"""
from __future__ import annotations

import re

from torch import nn

from ..errors import AttachError

KIND = "multihead_attention"


def _what(name) -> str:
    return f"{name} is an nn.MultiheadAttention (layer kind {KIND!r})"


def matched(model, cfg, names) -> list[tuple[str, nn.Module]]:
    """(name, module) of every nn.MultiheadAttention that ``names`` (regexes) select, after
    ``exclude_names`` and ``layers``."""
    from ..targets import layer_index
    if not names:
        return []
    return [(n, m) for n, m in model.named_modules()
            if n and isinstance(m, nn.MultiheadAttention) and any(re.search(p, n) for p in names)
            and not any(re.search(p, n) for p in cfg.exclude_names)
            and (cfg.layers is None or layer_index(n) in cfg.layers)]


def check_module(name, module) -> None:
    if not module._qkv_same_embed_dim:
        raise AttachError(f"{_what(name)} with separate q/k/v weights (kdim={module.kdim}, vdim="
                          f"{module.vdim}, embed_dim={module.embed_dim}): lora-lite adapts the packed "
                          "in_proj_weight only (as PEFT); leave it out of target_names")
    if not isinstance(module.out_proj, nn.Linear):
        raise AttachError(f"{_what(name)} whose out_proj is a {type(module.out_proj).__name__}, "
                          "not an nn.Linear; leave it out of target_names")


def check_variant(name, cfg) -> None:
    from ..param_targets import refusal_reason
    from ..plugins import get_variant
    why = refusal_reason(get_variant(cfg.variant))
    if why:
        raise AttachError(f"variant {cfg.variant!r} cannot adapt {name} (nn.MultiheadAttention, layer "
                          f"kind {KIND!r}): {why}; use a variant with a weight-space form "
                          "(merged_weight), or leave it out of target_names")


def mha_param_targets(model, cfg) -> list:
    """The parameter targets (in_proj_weight, out_proj.weight) of the selected attentions."""
    found = []
    for name, module in matched(model, cfg, tuple(cfg.target_names)):
        check_module(name, module)
        check_variant(name, cfg)
        found += _pair(name, module)
    return found


def _pair(name, module) -> list:
    from ..param_targets import make_param_target
    out = make_param_target(f"{name}.out_proj", module.out_proj, "weight", module.out_proj.weight)
    out.host = module  # its call reads out_proj.weight
    return [make_param_target(name, module, "in_proj_weight", module.in_proj_weight), out]


def refuse_out_proj_alone(model, names) -> None:
    """A name that selects ``<attention>.out_proj`` but not the attention itself is refused."""
    for name, module in model.named_modules():
        if (isinstance(module, nn.MultiheadAttention) and not any(re.search(p, name) for p in names)
                and any(re.search(p, f"{name}.out_proj") for p in names)):
            raise AttachError(f"{name}.out_proj is the output projection of {_what(name)}: its "
                              f"forward never runs; name {name!r} itself to adapt in_proj_weight and "
                              "out_proj.weight together (as PEFT), or leave it out of target_names")


def hosts(model) -> dict:
    """{id(out_proj): its nn.MultiheadAttention}: the module whose call reads out_proj.weight."""
    return {id(m.out_proj): m for m in model.modules()
            if isinstance(m, nn.MultiheadAttention) and isinstance(getattr(m, "out_proj", None), nn.Module)}


def peft_prefix(pt) -> str | None:
    """The module path PEFT stores this parameter target's tensors under, when it is an
    attention projection: ``<attention>`` for in_proj_weight, ``<attention>.base_layer.out_proj``
    for out_proj.weight; None for any other parameter."""
    if isinstance(pt.module, nn.MultiheadAttention) and pt.param == "in_proj_weight":
        return pt.module_name
    if isinstance(pt.host, nn.MultiheadAttention) and pt.param == "weight":
        return f"{pt.module_name.rpartition('.')[0]}.base_layer.out_proj"
    return None


# PEFT before 0.22.0 applied an attention's out_proj delta twice (huggingface/peft#3774); 0.22.0
# doubles lora_B of a folder saved before it (or with no peft_version: older than 0.18) on load,
# and so does lora-lite. Exports say this version, so PEFT loads them as they are.
PEFT_OUT_PROJ_FIXED = (0, 22, 0)


def legacy_out_proj_factor(peft_version) -> float:
    """2.0 for a folder whose out_proj lora_B PEFT (>= 0.22) doubles on load, else 1.0: no
    peft_version, a release before 0.22.0, or a dev build before 0.21.1 (PEFT's own rule)."""
    import re
    found = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?(\.?dev\d*)?", str(peft_version or "").partition("@")[0])
    if not found:
        return 2.0
    release = tuple(int(x or 0) for x in found.groups()[:3])
    if found.group(4):
        return 2.0 if release < (0, 21, 1) else 1.0
    return 2.0 if release < PEFT_OUT_PROJ_FIXED else 1.0


def attention_names(param_targets) -> list[str]:
    """The nn.MultiheadAttention modules among these parameter targets (PEFT's target_modules)."""
    return sorted({pt.module_name for pt in param_targets
                   if isinstance(pt.module, nn.MultiheadAttention) and pt.param == "in_proj_weight"}
                  | {pt.module_name.rpartition(".")[0] for pt in param_targets
                     if isinstance(pt.host, nn.MultiheadAttention) and pt.host is not pt.module})


def _attentions_in_file(model, weights) -> list[tuple[str, nn.Module]]:
    from ..peft.checks import weights_entries
    from ..peft.export import MODULE_PREFIX
    keys = list(weights_entries(weights))
    return [(n, m) for n, m in model.named_modules()
            if n and isinstance(m, nn.MultiheadAttention)
            and any(k.startswith(f"{MODULE_PREFIX}{n}.lora_") for k in keys)]


def names_attention(model, weights) -> bool:
    """Whether a PEFT weights file holds tensors of an nn.MultiheadAttention of ``model``."""
    return bool(_attentions_in_file(model, weights))


def peft_targets(model, weights, where) -> list:
    """The parameter targets of the attentions a PEFT weights file adapts (both projections)."""
    from ..errors import AdapterFileError
    out = []
    for name, module in _attentions_in_file(model, weights):
        try:
            check_module(name, module)
        except AttachError as e:
            raise AdapterFileError(f"{where}: {e}") from None
        out += _pair(name, module)
    return out
