"""The variant contract: ``ParamSpec`` (one adapter tensor) and the ``Variant`` base class.

A variant is a subclass of ``Variant`` (registration refuses any other class) with ``name``,
``config`` (an AdapterConfig subclass), ``param_specs`` and ``forward(layer, x, y, cfg) -> y_new``
(output hook) or ``forward_input(layer, x, cfg) -> x_new`` (input pre-hook), or both (the
pre-hook changes x, the output hook then sees the changed x and post-processes y: e.g. a rotation
of the input followed by a per-output scale). Every other member is optional and defaulted on
``Variant``: core and the CLI read them directly (``variant.init is None``: not provided).
Members are written as plain functions in the class body (no ``self``; a variant class is never
instantiated, its members are called on the class); ``Variant`` makes them static methods, so
``@staticmethod`` is accepted but not needed. Variants see every target as (d_in, d_out) with a
dense (d_out, d_in) weight through ``ll.dense_weight``, whatever the layer kind stores.
docs/plugin-contract.md has the whole contract; ``lora_lite.testing.check_variant`` checks a
variant against it.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

Init = str | Callable[[torch.Tensor, torch.Generator], None]
Member = Callable[..., Any] | None


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
    """The base class of every variant: the contract's members, each optional one defaulted.

    Required: ``name``, ``config``, ``param_specs(d_in, d_out, cfg) -> {name: ParamSpec}`` and
    ``forward(layer, x, y, cfg)`` and/or ``forward_input(layer, x, cfg)``. Optional callables
    default to None (core uses its generic path, or refuses the operation in one line):

    * ``init(layer, cfg)``: after the tensors are made (e.g. from the base weight);
      ``group_init(model, targets, cfg, calibration_data)``: once over all targets;
      ``after_load(layer, cfg)``: rebuild what ``init`` derived, from the loaded tensors;
      ``default_target_names(model) -> tuple of regexes``: the variant's own targets on this
      model when the config names none (raise AttachError listing the candidates if none fit).
    * ``added_macs(target, cfg) -> (per_token, per_call)``: multiply-accumulates the adapter adds
      on one target (``target.d_in``, ``target.d_out``, ``target.name``); the cost report checks
      2 x this against torch's FLOP counter. Without it: every 2-D adapter tensor once per token.
    * ``merged_weight(layer, cfg) -> (W', b')``: fp32 (d_out, d_in) weight and bias (None = the
      layer's own) with adapted layer(x) == x W'ᵀ + b'; reads the base only through
      ``dense_weight`` / ``base_dense_weight``. ``param_delta(view, cfg)``: the same for fused
      parameter targets (lora_lite.param_targets).
    * ``peft_config(cfg, target_names) -> dict | None``: PEFT's adapter_config.json content
      (with ``peft_type``), None when PEFT has no counterpart; ``peft_state(layer, cfg) ->
      {name: tensor}``: this layer's tensors in PEFT's naming (e.g. ``lora_A.weight``), relative
      to the module, no adapter name. ``from_peft(peft_config) -> dict | None``,
      ``load_peft_state(layer, cfg, tensors)``, ``peft_init(peft_model, calibration_data)``: the
      way back, and a data-driven init on PEFT's side; ``peft_fields_for_tensors(fields,
      tensors_by_module) -> fields``: the imported config fields corrected by what the tensors
      hold (where PEFT's own loader follows the tensors), before attach;
      ``peft_training_config(cfg, target_names)``: the PEFT config the cost comparison trains;
      ``peft_param_state`` / ``load_peft_param_state``: PEFT's form of parameter targets.
    * ``lowrank_factors(layer, cfg)``, ``lowrank_config(rank, target_names)``,
      ``load_lowrank(layer, cfg, A, B)``: what ``ll.combine`` reads and builds (lora_lite.combine).
    """

    name: ClassVar[str] = ""
    config: ClassVar[Any] = None
    # Does attach change the base weight (init writing through set_dense_weight)? A bool (always /
    # never), or a callable rewrites_weight(cfg) -> bool when the config decides (e.g. only with
    # cfg.rewrite_base). Ask ``rewrites_base(variant, cfg)``; check_variant holds it to the truth.
    rewrites_weight: ClassVar[Any] = False
    needs_calibration: ClassVar[bool] = False   # attach() must get calibration_data
    mixed_batch: ClassVar[bool] = True          # rows of a batch are independent (ll.rows may mix)
    supports_quantized: ClassVar[bool] = True   # works on bitsandbytes 4bit/8bit bases
    paper: ClassVar[str] = ""
    # -- what lora-lite-cli's training and reports use (all optional) --------------------------
    # train_defaults: {"lr": 2e-3, "targets": (regex, ...), "alpha": "r" (alpha = r) or a float,
    #   "calibration": batches for a data-initialised variant, "knobs": {field: value}}; every
    #   key optional, the rest generic (lora_lite_cli.defaults.variant_defaults resolves them).
    train_defaults: ClassVar[dict | None] = None
    cost_note: ClassVar[str] = ""               # why measured FLOPs may differ from 2 x added_macs
    peft_cost_note: ClassVar[str] = ""          # the same for PEFT's implementation of this method
    mergeable: ClassVar[bool] = True            # False: merging is refused up front (merge_refusal)
    # layer families the variant adapts ("linear", "embedding", "conv"; lora_lite.layers.kinds):
    # attach refuses a target of another family in one line, naming the layer and its kind
    layer_kinds: ClassVar[tuple] = ("linear",)
    merge_refusal: ClassVar[str] = ""

    # -- the math and its optional companions (None: not provided) -----------------------------
    forward: ClassVar[Member] = None
    forward_input: ClassVar[Member] = None
    init: ClassVar[Member] = None
    group_init: ClassVar[Member] = None
    after_load: ClassVar[Member] = None
    default_target_names: ClassVar[Member] = None
    added_macs: ClassVar[Member] = None
    merged_weight: ClassVar[Member] = None
    param_delta: ClassVar[Member] = None
    peft_config: ClassVar[Member] = None
    peft_training_config: ClassVar[Member] = None
    peft_state: ClassVar[Member] = None
    from_peft: ClassVar[Member] = None
    load_peft_state: ClassVar[Member] = None
    peft_init: ClassVar[Member] = None
    peft_fields_for_tensors: ClassVar[Member] = None
    peft_param_state: ClassVar[Member] = None
    load_peft_param_state: ClassVar[Member] = None
    lowrank_factors: ClassVar[Member] = None
    lowrank_config: ClassVar[Member] = None
    load_lowrank: ClassVar[Member] = None

    @staticmethod
    def param_specs(d_in: int, d_out: int, cfg) -> dict:
        raise NotImplementedError

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for attr, value in list(vars(cls).items()):
            if isinstance(value, types.FunctionType) and not attr.startswith("__"):
                setattr(cls, attr, staticmethod(value))  # a plain def in the body: no self
        _adapt_old_forward(cls, "forward", ("layer", "x", "y"))
        _adapt_old_forward(cls, "forward_input", ("layer", "x"))


def _positional_count(fn) -> int | None:
    """How many positional arguments ``fn`` takes (None: any number, or no signature)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _adapt_old_forward(cls, attr, old_args):
    """A ``forward(layer, x, y)`` / ``forward_input(layer, x)`` without the cfg argument (the
    deprecated arity) is wrapped to take (and ignore) cfg, with a DeprecationWarning.
    Detected once, when the class is defined."""
    if attr not in vars(cls) or vars(cls)[attr] is None:
        return
    old = getattr(cls, attr)
    if not callable(old) or _positional_count(old) != len(old_args):
        return
    warnings.warn(f"variant {cls.__qualname__}: {attr}({', '.join(old_args)}) without cfg is "
                  f"deprecated; define {attr}({', '.join(old_args)}, cfg) (cfg: the layer's "
                  "config, so layer._lora_cfg need not be read)", DeprecationWarning, stacklevel=3)

    def adapted(*args, cfg=None):
        return old(*args[:len(old_args)])
    adapted.__wrapped__ = old  # type: ignore[attr-defined]
    setattr(cls, attr, staticmethod(adapted))


_NAME_RE = re.compile(r"^[a-z0-9_]+$")


def registered_name(offered) -> str | None:
    """The name an object offered for registration gives itself (None unless a string), read
    before it is known to be a Variant: problems with it are reported under that name."""
    name = getattr(offered, "name", None)
    return name if isinstance(name, str) else None


def contract_problem(cls) -> str | None:
    """Why ``cls`` breaks the variant contract (one line), or None if it meets it."""
    from .config import AdapterConfig
    if not (isinstance(cls, type) and issubclass(cls, Variant)):
        return f"{cls!r} is not a variant: variant classes must subclass lora_lite.Variant"
    name = cls.name
    if not isinstance(name, str) or not _NAME_RE.match(name):
        return f"variant {cls!r} has no valid .name (a string of [a-z0-9_]+)"
    cfg = cls.config
    if not (isinstance(cfg, type) and issubclass(cfg, AdapterConfig) and dataclasses.is_dataclass(cfg)):
        return f"variant {name!r}: .config must be a dataclass subclassing lora_lite.AdapterConfig"
    default = {f.name: f.default for f in dataclasses.fields(cfg)}.get("variant")
    if default != name:
        return f"variant {name!r}: its config's `variant` field must default to {name!r}, not {default!r}"
    if cls.param_specs is Variant.param_specs or not callable(cls.param_specs):
        return f"variant {name!r} has no param_specs(d_in, d_out, cfg)"
    if not (callable(cls.forward) or callable(cls.forward_input)):
        return (f"variant {name!r} must define forward(layer, x, y, cfg) or "
                "forward_input(layer, x, cfg) (or both); it has none")
    return None


def rewrites_base(variant, cfg) -> bool:
    """Whether attaching ``variant`` with ``cfg`` rewrites the base weight (its ``rewrites_weight``
    flag, or that callable's answer for ``cfg``)."""
    flag = variant.rewrites_weight
    return bool(flag(cfg)) if callable(flag) else bool(flag)


def hook_kind(variant) -> str:
    """"input", "output", or "input+output" (both hooks)."""
    has_input = variant.forward_input is not None
    has_output = variant.forward is not None
    if has_input and has_output:
        return "input+output"
    return "input" if has_input else "output"
