"""The variant contract: ``ParamSpec`` (one adapter tensor) and an optional ``Variant`` base class.

A variant is any class with ``name``, ``config`` (an AdapterConfig subclass), ``param_specs``
and ``forward(layer, x, y) -> y_new`` (output hook) or ``forward_input(layer, x) -> x_new``
(input pre-hook), or both (the pre-hook changes x, the output hook then sees the changed x and
post-processes y: e.g. a rotation of the input followed by a per-output scale). Optional: ``init(layer, cfg)``,
``group_init(model, targets, cfg, calibration_data)``, ``after_load(layer, cfg)`` (rebuild what
``init`` derived from the base weight using the loaded tensors),
``default_target_names(model) -> tuple of regexes`` (the variant's own targets on this model when
the config names none, e.g. per architecture; raise AttachError listing the candidates if there
are none), the flags and report members of ``Variant`` below, and the interop members documented
on it. Variants see every target as (d_in, d_out) with a dense (d_out, d_in) weight through
``ll.dense_weight``, whatever the layer kind stores. docs/plugin-contract.md has the whole
contract; ``lora_lite.testing.check_variant`` checks a variant against it.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Init = str | Callable[[torch.Tensor, torch.Generator], None]


@dataclass(frozen=True)
class ParamSpec:
    """One adapter tensor on a target layer, registered as ``layer.<name>`` (name starts lora_).

    init: "zeros", "ones", "kaiming" (like nn.Linear's weight), "normal" (std 0.02), or a
    callable ``fill(tensor, generator)``. Non-trainable specs become buffers; non-persistent
    buffers are not saved (the variant must be able to regenerate them in ``init``).
    """

    shape: tuple
    init: Init = "zeros"
    trainable: bool = True
    persistent: bool = True


def make_tensor(spec: ParamSpec, dtype, device, generator) -> torch.Tensor:
    t = torch.empty(spec.shape, dtype=torch.float32)
    if callable(spec.init):
        with torch.no_grad():
            spec.init(t, generator)
    elif spec.init == "zeros":
        t.zero_()
    elif spec.init == "ones":
        t.fill_(1.0)
    elif spec.init == "kaiming":
        if t.dim() >= 2:  # nn.Linear's default: kaiming_uniform_(a=sqrt(5))
            torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
        else:
            t.normal_(0.0, 0.02, generator=generator)
    elif spec.init == "normal":
        t.normal_(0.0, 0.02, generator=generator)
    else:
        raise ValueError(f"unknown ParamSpec init {spec.init!r}")
    return t.to(device=device, dtype=dtype)


class Variant:
    """Optional base class; documents the contract and gives defaults for the descriptive flags.

    Optional callables (not defined here: core and the CLI test whether a variant has them and
    use generic fallbacks when it has not):

    * ``added_macs(target, cfg) -> (per_token, per_call)``: multiply-accumulates the adapter adds
      on one target (``target.d_in``, ``target.d_out``, ``target.name``); the cost report checks
      2 x this against torch's FLOP counter. Without it: every 2-D adapter tensor once per token.
    * ``merged_weight(layer, cfg) -> (W', b')``: fp32 (d_out, d_in) weight and bias (None = the
      layer's own) with adapted layer(x) == x W'ᵀ + b'; reads the base only through
      ``dense_weight`` / ``base_dense_weight``.
    * ``peft_config(cfg, target_names) -> dict | None``: PEFT's adapter_config.json content
      (with ``peft_type``), None when PEFT has no counterpart; ``peft_state(layer, cfg) ->
      {name: tensor}``: this layer's tensors in PEFT's naming (e.g. ``lora_A.weight``), relative
      to the module, no adapter name. ``from_peft(peft_config) -> dict | None``,
      ``load_peft_state(layer, cfg, tensors)``, ``peft_init(peft_model, calibration_data)``: the
      way back, and a data-driven init on PEFT's side; ``peft_fields_for_tensors(fields,
      tensors_by_module) -> fields``: the imported config fields corrected by what the tensors
      hold (where PEFT's own loader follows the tensors), before attach.
    """

    name: str = ""
    config = None
    # Does attach change the base weight (init writing through set_dense_weight)? A bool (always /
    # never), or a callable rewrites_weight(cfg) -> bool when the config decides (e.g. only with
    # cfg.rewrite_base). Ask ``rewrites_base(variant, cfg)``; check_variant holds it to the truth.
    rewrites_weight: bool = False
    needs_calibration: bool = False   # attach() must get calibration_data
    mixed_batch: bool = True          # rows of a batch are independent (ll.rows may mix adapters)
    supports_quantized: bool = True   # works on bitsandbytes 4bit/8bit bases
    paper: str = ""
    # -- what lora-lite-cli's training and reports use (all optional) --------------------------
    # train_defaults: {"lr": 2e-3, "targets": (regex, ...), "alpha": "r" (alpha = r) or a float,
    #   "calibration": batches for a data-initialised variant, "knobs": {field: value}}; every
    #   key optional, the rest generic (lora_lite_cli.defaults.variant_defaults resolves them).
    train_defaults: dict | None = None
    cost_note: str = ""               # why measured FLOPs may differ from 2 x added_macs
    peft_cost_note: str = ""          # the same for PEFT's implementation of this method
    mergeable: bool = True            # False: merging is refused up front, for merge_refusal
    # layer families the variant adapts ("linear", "embedding", "conv"; lora_lite.layer_kinds):
    # attach refuses a target of another family in one line, naming the layer and its kind
    layer_kinds: tuple = ("linear",)
    merge_refusal: str = ""

    @staticmethod
    def param_specs(d_in: int, d_out: int, cfg) -> dict:
        raise NotImplementedError


def rewrites_base(variant, cfg) -> bool:
    """Whether attaching ``variant`` with ``cfg`` rewrites the base weight (its ``rewrites_weight``
    flag, or that callable's answer for ``cfg``)."""
    flag = getattr(variant, "rewrites_weight", False)
    return bool(flag(cfg)) if callable(flag) else bool(flag)


def hook_kind(variant) -> str:
    """"input", "output", or "input+output" (both hooks)."""
    has_input = callable(getattr(variant, "forward_input", None))
    has_output = callable(getattr(variant, "forward", None))
    if has_input and has_output:
        return "input+output"
    return "input" if has_input else "output"
