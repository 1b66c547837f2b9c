"""Target discovery: which linear-like layers of a model get an adapter, and in which role.

Selection, in order:

1. Candidates: every module some layer kind handles (``lora_lite.layers.kinds``: nn.Linear,
   transformers' Conv1D, bitsandbytes 4bit/8bit, plugin kinds), minus ``exclude_names`` and the
   projections inside ``nn.MultiheadAttention`` (it reads their weights directly, so hooks on
   them would never run; a name selecting the attention adapts its in_proj_weight and
   out_proj.weight as parameter targets, ``lora_lite.layers.mha``; one selecting only its out_proj, or a
   grouped / transposed conv, is refused). The defaults are the linear
   family; names may also select nn.Embedding and nn.Conv1d/2d/3d (the variant's ``layer_kinds`` then
   decide, at attach).
2. Names: ``target_names`` regexes (``re.search``). When empty, the variant's own
   ``default_target_names(model)`` if it has one (ia3: the k/v projections of this
   architecture); otherwise *every* candidate except the output head: PEFT's "all-linear". The
   head is ``model.get_output_embeddings()`` plus any layer whose weight is tied to an input
   embedding (the tied lm_head of GPT-2, T5, Qwen2...); BERT's ``cls.predictions.decoder`` is one.
3. ``layers``: transformer blocks by block index, the first ``<container>.<N>`` in the module
   path with container one of ``layers``, ``layer``, ``h``, ``block``, ``blocks`` (so
   ``model.layers.3``, ``transformer.h.3``, ``gpt_neox.layers.3``, ``encoder.layer.3``,
   ``encoder.block.3``/``decoder.block.3``, ``model.decoder.layers.3``; never T5's sub-layer
   index ``block.1.layer.0``).
4. Roles, an opt-in filter (``target_roles``, empty by default). Relative to the model width
   d_model: ``reader`` (d_in == d_model, reads the residual stream), ``writer`` (d_out ==
   d_model), ``inner`` (neither). A square layer is named by convention (q/k/v read; o, out,
   down, dense, c_proj write); one whose name does not tell gets role ``square`` and is an error
   only when ``target_roles`` asks for roles.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .errors import AttachError, VariantNotInstalled
from .layers.kinds import features, is_adaptable, is_linear_like

# The default targets of the command line and the conformance suite when a variant names none of
# its own: the attention's query and value projections, as upstream LoRA's benchmark. (The
# library's own default, an empty target_names, is every linear-like layer; see above.) The one
# place these regexes are written: help texts and other defaults are formatted from it.
DEFAULT_TARGET_NAMES = (r"q_proj$", r"v_proj$")

_BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)(?:\.|$)")
_WRITER_NAMES = ("o_proj", "out_proj", "down_proj", "dense_4h_to_h", "c_proj", "wo", "w2",
                 "fc2", "dense", "o", "out_lin")
_READER_NAMES = ("q_proj", "k_proj", "v_proj", "kq_proj", "qkv_proj", "query", "key", "value",
                 "q", "k", "v", "c_attn", "query_key_value", "q_lin", "k_lin", "v_lin")


@dataclass
class Target:
    name: str
    layer: nn.Module
    role: str
    d_in: int
    d_out: int


def model_width(model) -> int:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    width = getattr(config, "hidden_size", None)
    if isinstance(width, int):
        return width
    sizes = ([d for m in model.modules() if is_linear_like(m) for d in features(m)]
             or [d for m in model.modules() if is_adaptable(m) for d in features(m)])
    if not sizes:
        raise AttachError("this model has no linear-like layers (nn.Linear, transformers' "
                          "Conv1D, bitsandbytes Linear4bit/8bit) to adapt")
    return max(set(sizes), key=lambda d: (sizes.count(d), d))  # the residual width recurs most


def layer_index(name):
    """The transformer block index of a module path (see the module docstring), or None."""
    m = _BLOCK_INDEX.search(name)
    return int(m.group(1)) if m else None


def classify(name, d_in, d_out, d_model):
    if d_in == d_model and d_out != d_model:
        return "reader"
    if d_out == d_model and d_in != d_model:
        return "writer"
    if d_in == d_out == d_model:
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _WRITER_NAMES or any(k in leaf for k in _WRITER_NAMES if len(k) > 4):
            return "writer"
        if leaf in _READER_NAMES or any(k in leaf for k in _READER_NAMES if len(k) > 4):
            return "reader"
        return None  # ambiguous
    return "inner"


def output_head_ids(model) -> set[int]:
    """ids of the output head modules: get_output_embeddings() and layers tied to an embedding."""
    heads = set()
    get_head = getattr(model, "get_output_embeddings", None)
    if callable(get_head):
        try:
            head = get_head()
        except (NotImplementedError, AttributeError):
            head = None
        if isinstance(head, nn.Module):
            heads.add(id(head))
    embedding_weights = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    tied = {id(w) for w in embedding_weights} | {w.data_ptr() for w in embedding_weights}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Embedding) or weight is None or not hasattr(weight, "data_ptr"):
            continue
        if id(weight) in tied or (weight.numel() and weight.data_ptr() in tied):
            heads.add(id(module))
    return heads


def linear_layers(model, accept=is_linear_like) -> list[tuple[str, nn.Module]]:
    """Every (name, module) of the linear family, in model order (MultiheadAttention's skipped);
    ``accept=is_adaptable``: every layer kind (embeddings and convolutions too)."""
    hidden = {id(m.out_proj) for m in model.modules()
              if isinstance(m, nn.MultiheadAttention) and hasattr(m, "out_proj")}
    return [(n, m) for n, m in model.named_modules()
            if n and id(m) not in hidden and accept(m)]


def refuse_unadaptable(model, names):
    """A name selecting a layer lora-lite cannot adapt is refused in one line rather than
    skipped: an nn.MultiheadAttention's out_proj alone (its forward never runs; the attention
    itself is adapted through its weights, ``lora_lite.layers.mha``), and convolutions outside the conv
    kind (grouped, non-zero padding, transposed)."""
    from .layers.mha import refuse_out_proj_alone
    refuse_out_proj_alone(model, names)  # the attention itself is a parameter target (lora_lite.layers.mha)
    for name, module in model.named_modules():
        if (isinstance(module, nn.modules.conv._ConvNd) and not is_adaptable(module)
                and any(re.search(p, name) for p in names)):
            raise AttachError(
                f"{name} is a {type(module).__name__} with groups={module.groups}, padding_mode="
                f"{module.padding_mode!r}: lora-lite adapts plain convolutions only (groups=1, "
                "zero padding, not transposed); leave it out of target_names")


def describe_candidates(model, limit=16) -> str:
    """'leaf (d_in->d_out), ...' over the distinct leaf names of the linear-like layers."""
    seen: dict[str, str] = {}
    for name, module in linear_layers(model):
        leaf = re.sub(r"(?:^|\.)\d+(?=\.|$)", ".N", name).lstrip(".")
        seen.setdefault(leaf, "{}->{}".format(*features(module)))
    items = [f"{k} ({v})" for k, v in seen.items()]
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def variant_default_names(model, cfg) -> tuple:
    """The variant's own per-architecture target names, or () for "all-linear"."""
    from .plugins import get_variant
    try:
        variant = get_variant(cfg.variant)
    except VariantNotInstalled:
        return ()
    pick = variant.default_target_names
    return tuple(pick(model)) if pick is not None else ()


def find_targets(model, cfg) -> list[Target]:
    d_model = model_width(model)
    names = tuple(cfg.target_names) or variant_default_names(model, cfg)
    heads = output_head_ids(model) if not names else set()
    if names:
        refuse_unadaptable(model, names)
    found = []
    for name, module in linear_layers(model, is_adaptable if names else is_linear_like):
        if id(module) in heads or any(re.search(p, name) for p in cfg.exclude_names):
            continue
        if names and not any(re.search(p, name) for p in names):
            continue
        if cfg.layers is not None and layer_index(name) not in cfg.layers:
            continue
        d_in, d_out = features(module)
        role = classify(name, d_in, d_out, d_model)
        if role is None:
            if cfg.target_roles:
                raise AttachError(
                    f"cannot tell whether square layer {name!r} ({d_in}x{d_out}) reads or writes "
                    "the residual stream; select layers by name with target_names=[...] and "
                    "target_roles=() (any role), or exclude it with exclude_names")
            role = "square"
        if cfg.target_roles and role not in cfg.target_roles:
            continue
        found.append(Target(name, module, role, d_in, d_out))
    if not found:
        from .layers.mha import matched
        if not matched(model, cfg, tuple(cfg.target_names)):  # else: attentions only, adapted as parameter targets
            raise AttachError(no_match_message(model, cfg, names))
    return found


def no_match_message(model, cfg, names):
    hint = ""
    if cfg.layers is not None and not any(layer_index(n) is not None for n, _ in linear_layers(model)):
        hint = (" This model has no transformer blocks under layers/layer/h/block/blocks.N, "
                "so layers= selects nothing; use layers=None.")
    return (f"no layer matched: target_names={list(names)}, target_roles={list(cfg.target_roles)}, "
            f"layers={cfg.layers}, exclude_names={list(cfg.exclude_names)}.{hint} Linear-like "
            f"layers of this model: {describe_candidates(model)}")
