"""``check_variant``: run the variant contract's invariants on any variant, for plugin authors.

Per base (fp32, bitsandbytes 4bit / 8bit): identity at init; gradients on every trainable
adapter tensor and on nothing else; an optimizer step changes the output; attach rewrites the
base weight exactly when ``rewrites_weight`` says so for the config; the base is not changed by
training; save -> load on a fresh base reproduces the output; the file holds only
adapter tensors; detach restores the state_dict bit for bit; several named adapters of the
variant switch, sum, share a mixed batch exactly, save / load and detach by name
(``lora_lite.testing.conformance_multi``). On fp32, when the variant declares
them: PEFT parity (``peft_config`` + ``peft_state``) and merge exactness (``merged_weight``).
The first failure raises ``VariantCheckFailed`` with a one-line reason; otherwise the measured
figures are returned. An unregistered class is registered in-process for the duration.
"""
from __future__ import annotations

import contextlib
import copy
from typing import NoReturn

import torch

from ..attach import attach, attached
from ..config import config as make_config
from ..plugins import register_plugin, unregister_plugin, variant_problem, variants
from ..variant import rewrites_base
from .conformance_multi import check_multi
from .testbed import BASES, logits, make_batch, measure_invariants, model_maker, perturb

DEFAULT_FIELDS = {"r": 4, "target_names": (r"q_proj$", r"v_proj$"), "target_roles": ()}
_KIT_PLUGIN = "lora-lite-check-variant"
_TRAIN_KEYS = {"lr", "targets", "alpha", "calibration", "knobs"}


class VariantCheckFailed(AssertionError):
    """A variant broke an invariant of the contract; the message says which, in one line."""


def _fail(reason) -> NoReturn:
    raise VariantCheckFailed(" ".join(str(reason).split()))


def check_variant(variant, cfg=None, *, bases=("fp32",), calibration_data=None, batch=None,
                  bias=False, steps=2, lr=1e-2, identity_tol=1e-5, reload_tol=1e-5,
                  parity_tol=1e-5, merge_tol=1e-5, peft=True, merge=True, multi=True,
                  mix_tol=None, **cfg_fields) -> dict:
    """Check ``variant`` (a class, registered or not, or a registered name) on tiny random Llamas.

    cfg: a config of the variant, else ``ll.config(name, **{r: 4, q_proj/v_proj} | cfg_fields)``.
    bases: any of "fp32", "4bit", "8bit"; bias: projections with random biases.
    identity_tol / reload_tol: a float, or {base: float}; tolerances on max |logit difference|.
    peft / merge: False skips those checks even when the variant declares them.
    multi: the named-adapter checks of ``lora_lite.testing.conformance_multi`` on every base (mix_tol:
    the mixed-batch tolerance, default 1e-6 on fp32, max(reload_tol, 1e-6) on 4bit / 8bit, whose
    CPU kernels round a row differently at another batch size).
    Returns {"variant", "trainable", "bases": {base: figures}, "peft_parity", "merge_err"}
    (None where a check did not apply).
    """
    cls = variants().get(variant) if isinstance(variant, str) else variant
    if cls is None:
        _fail(f"variant {variant!r} is not registered; pass the class to check it unregistered")
    problem = variant_problem(cls)
    if problem is not None:
        _fail(f"contract: {problem}")
    with _registered(cls):
        cfg = cfg if cfg is not None else make_config(cls.name, **{**_defaults(cls), **cfg_fields})
        batch = batch if batch is not None else make_batch()
        out = {"variant": cls.name, "bases": {}, "peft_parity": None, "merge_err": None}
        for base in bases:
            reload = _per_base(reload_tol, base)
            figures = _check_base(cls, cfg, base, batch, calibration_data, bias, steps, lr,
                                  _per_base(identity_tol, base), reload)
            if multi and "skipped" not in figures:
                mix = (_per_base(mix_tol, base) if mix_tol is not None
                       else (1e-6 if base == "fp32" else max(reload, 1e-6)))
                figures["multi"] = check_multi(_fail, cls, cfg, model_maker(base, bias=bias),
                                               calibration_data, reload, mix)
            out["bases"][base] = figures
            out["trainable"] = figures["trainable"]
        _check_declarations(cls, cfg)
        if (peft and cls.peft_config is not None) or (merge and cls.merged_weight is not None):
            out.update(_check_fp32_extras(cls, cfg, batch, calibration_data, bias, parity_tol,
                                          merge_tol, peft, merge))
    return out


def _per_base(tol, base):
    """A tolerance given per base ({base: value}) or one for all."""
    return tol[base] if isinstance(tol, dict) else tol


def _defaults(cls) -> dict:
    fields = dict(DEFAULT_FIELDS)
    if not cls.config.uses_rank:
        fields.pop("r")
    if cls.config.target_names:
        fields.pop("target_names")  # the variant's own default targets
    return fields


@contextlib.contextmanager
def _registered(cls):
    """Make ``cls`` the variant its name resolves to, for the duration (in-process plugin)."""
    if variants().get(cls.name) is cls:
        yield
        return

    class KitPlugin:  # registered preferred: it keeps the name on a clash, even over a built-in
        @staticmethod
        def register_variants(register):
            register(cls)
    from ..plugins.hookspecs import hookimpl
    KitPlugin.register_variants = staticmethod(hookimpl(KitPlugin.register_variants))
    register_plugin(KitPlugin, _KIT_PLUGIN, distribution="(check_variant)", preferred=True)
    try:
        if variants().get(cls.name) is not cls:
            _fail(f"variant {cls.name!r} could not be registered for the check")
        yield
    finally:
        unregister_plugin(_KIT_PLUGIN)


def _check_base(cls, cfg, base, batch, calibration_data, bias, steps, lr, identity_tol,
                reload_tol) -> dict:
    if base not in BASES:
        _fail(f"unknown base {base!r}; choose from {', '.join(BASES)}")
    if base != "fp32" and not cls.supports_quantized:
        return {"skipped": "the variant says supports_quantized = False"}
    m = measure_invariants(model_maker(base, bias=bias), cfg, batch,
                           calibration_data=calibration_data, steps=steps, lr=lr)
    on = f"on the {base} base"
    declared = rewrites_base(cls, cfg)
    if m["rewrote_base"] != declared:
        _fail(f"rewrites_weight says {declared} for this config, but attach "
              f"{'changed' if m['rewrote_base'] else 'did not change'} the base weight {on}; "
              "make rewrites_weight (a bool, or a function of the config) tell the truth")
    if not m["identity_err"] <= identity_tol:
        _fail(f"not the identity at init {on}: max |logit difference| {m['identity_err']:.3g} "
              f"> {identity_tol:g}")
    if m["trainable"] == 0:
        _fail(f"no trainable adapter tensor {on}: param_specs has no trainable spec")
    if m["base_grad_leaks"]:
        _fail(f"gradient reached base parameter(s) {on}: {', '.join(m['leak_names'][:3])}")
    if m["zero_grad_adapters"]:
        _fail(f"adapter tensor(s) got no gradient after {steps} steps {on}: "
              f"{', '.join(m['zero_grad_names'][:3])}")
    if not m["trained_delta"] > 0:
        _fail(f"an optimizer step did not change the output {on}")
    if m["base_changed"]:
        _fail(f"training changed a base tensor {on} (only adapter tensors may change)")
    if not m["reload_err"] <= reload_tol:
        _fail(f"save -> load does not reproduce the output {on}: max |logit difference| "
              f"{m['reload_err']:.3g} > {reload_tol:g}")
    stray = [k for k in m["file_keys"] if ".lora_" not in k]
    if stray:
        _fail(f"the adapter file holds non-adapter tensor(s) {on}: {', '.join(stray[:3])}")
    if not m["detach_bitexact"]:
        _fail(f"detach does not restore the state_dict bit for bit {on}")
    return m


def _check_declarations(cls, cfg):
    """The optional report members, when declared, have the shapes the CLI expects."""
    own = cls.train_defaults
    if own is not None and not (isinstance(own, dict) and set(own) <= _TRAIN_KEYS):
        _fail(f"train_defaults must be a dict with keys among {sorted(_TRAIN_KEYS)}, not {own!r}")
    if cls.added_macs is not None:
        from ..targets import Target
        target = Target("probe", torch.nn.Linear(64, 32), "reader", 64, 32)
        macs = cls.added_macs(target, cfg)
        if not (isinstance(macs, tuple) and len(macs) == 2
                and all(isinstance(v, int) and v >= 0 for v in macs)):
            _fail(f"added_macs must return (MACs per token, MACs per call) as ints >= 0, not {macs!r}")


def _check_fp32_extras(cls, cfg, batch, calibration_data, bias, parity_tol, merge_tol, peft,
                       merge) -> dict:
    """PEFT parity and merge exactness, on one fp32 model whose adapter was moved off its init."""
    base = model_maker("fp32", bias=bias)()
    ours = copy.deepcopy(base)
    attach(ours, cfg, calibration_data=calibration_data)
    perturb(ours)
    ours_out, base_out = logits(ours, batch), logits(base, batch)
    if not (ours_out - base_out).abs().max().item() > 10 * parity_tol:
        _fail("the perturbed adapter still computes the identity: parity would prove nothing")
    out: dict[str, float | None] = {}
    if merge and cls.merged_weight is not None:
        out["merge_err"] = _merge_error(cls, ours, merge_tol)
    if peft and cls.peft_config is not None:
        out["peft_parity"] = _peft_parity(cls, cfg, ours, ours_out, base, batch, parity_tol)
    return out


def _merge_error(cls, model, tol) -> float:
    """max over targets of |layer(x) - (x W'^T + b')| / max(1, |layer(x)|) on random x."""
    worst = 0.0
    g = torch.Generator().manual_seed(0)
    state = attached(model)
    assert state is not None, "the conformance model has an adapter attached"
    with torch.no_grad():
        for t in state.targets:
            W, b = cls.merged_weight(t.layer, state.cfg)
            if tuple(W.shape) != (t.d_out, t.d_in):
                _fail(f"merged_weight of {t.name} has shape {tuple(W.shape)}, expected "
                      f"{(t.d_out, t.d_in)}")
            b = t.layer.bias if b is None else b
            x = torch.randn(3, t.d_in, generator=g)
            y = t.layer(x).float()
            merged = x @ W.float().T + (0 if b is None else b.float())
            worst = max(worst, ((y - merged).abs().max() / y.abs().max().clamp(min=1)).item())
    if not worst <= tol:
        _fail(f"merged_weight is not the adapted layer: relative error {worst:.3g} > {tol:g}")
    return worst


def _peft_parity(cls, cfg, ours, ours_out, base, batch, tol) -> float | None:
    """Build PEFT's model from ``peft_config``, copy ``peft_state`` in, compare the logits."""
    import peft
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    state = attached(ours)
    assert state is not None, "the conformance model has an adapter attached"
    names = [t.name for t in state.targets]
    spec = cls.peft_config(cfg, names)
    if spec is None:
        return None  # PEFT has no counterpart
    spec = {**copy.deepcopy(spec), "target_modules": names}  # as export_peft writes it
    theirs = peft.get_peft_model(base, peft.get_peft_config(spec))
    tensors: dict[str, torch.Tensor] = {}
    for t in state.targets:
        for key, value in cls.peft_state(t.layer, t.layer._lora_cfg).items():
            # keys starting base_model. are shared by all targets (e.g. VeRA's projections)
            full = key if key.startswith("base_model.") else f"base_model.model.{t.name}.{key}"
            if full in tensors and not (tensors[full].shape == value.shape
                                        and torch.equal(tensors[full], value)):
                _fail(f"peft_state gives targets different {key!r}, which PEFT shares across "
                      "targets: check on targets of one shape, or pass peft=False")
            tensors[full] = value.detach().clone()
    wanted = set(get_peft_model_state_dict(theirs, save_embedding_layers=False))
    missing, extra = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
    if missing or extra:
        _fail(f"peft_state does not match PEFT's tensors: missing {missing[:2]}, unexpected "
              f"{extra[:2]}")
    set_peft_model_state_dict(theirs, tensors)
    err = (ours_out - logits(theirs.eval(), batch)).abs().max().item()
    if not err <= tol:
        _fail(f"PEFT parity: max |logit difference| {err:.3g} > {tol:g} with the same adapter "
              "values (peft_config / peft_state)")
    return err
