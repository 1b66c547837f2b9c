"""What an adapter costs: parameters, added compute, time, memory, init time (``cost-report``).

Conventions (upstream lora-lite's cost report got the first one wrong: it compared FLOPs with MACs):

* A MAC is one multiply-accumulate. ``torch.utils.flop_counter.FlopCounterMode`` counts a
  matmul of (m×k)·(k×n) as 2·m·k·n FLOPs, so measured added FLOPs per token should equal
  **2 ×** the analytic added MACs per token. The report shows both and their ratio
  ``measured FLOPs / (2 × analytic MACs)``: 1.00 means the count is right. The counter sees only
  matmul-like ops (mm, bmm, addmm, einsum, sdpa), not elementwise work (IA3's gains, RoAd's
  rotations, norms) nor linear solves.
* Analytic MACs come from the variant itself (its optional ``added_macs(target, cfg)``: MACs
  per token and per forward call on one target); ``macs_rule`` is ``variant`` then. Work done
  once per forward call (e.g. DoRA's B·A for the weight norm) is spread over the batch's tokens
  (batch × seq-len). A variant that gives no count gets the ``generic`` rule: every 2-D adapter
  tensor is used once per token in a matmul.
* Time: median over ``repeats`` runs after ``warmup`` runs; lora-lite and PEFT rows of one
  variant are timed interleaved (one run of each in turn) so machine noise hits both alike, and
  each ratio is the median of the per-turn ratios with their spread (min-max) beside it.
* Memory: the peak above what was held just before the row's window (attach/init + warm-up
  forward and training steps: adapter tensors, optimizer state, activations, gradients).
  CUDA: ``torch.cuda.max_memory_allocated``. CPU: the process's peak resident set (Linux
  VmHWM, reset through /proc/self/clear_refs; glibc's mmap threshold is pinned at 1 MiB so
  freed tensors go back to the OS and the baseline is honest). The measuring (random token
  batches, synchronised timing, rotating turn order, ``PeakMemory``) is
  ``lora_lite.testing.measure``, shared with the benchmarks; this module keeps the report.

* Memory split (``adapter_mb``, ``optimizer_mb``, ``activations_mb``): the bytes of the
  trainable tensors, of AdamW's state after a step, and the peak of one training step above the
  level before it minus the gradients (activations kept for backward and temporaries).

The CLI holds no table of variants: everything variant-specific comes from the variant class
(``added_macs``, ``cost_note``, ``peft_cost_note``, ``peft_config``, ``peft_init``).
"""
from __future__ import annotations

import copy
import gc
import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from lora_lite.testing.measure import PeakMemory, interleaved, sync, token_batch

# ---------------------------------------------------------------------------------------------
# What the variant says about itself (all optional; generic fallbacks when absent)
# ---------------------------------------------------------------------------------------------


def analytic_macs(variant_cls, targets, cfg, tokens_per_call: int) -> tuple[float | None, str]:
    """(added MACs per token over all targets, rule). The variant's own ``added_macs(target,
    cfg) -> (per token, per forward call)``; per-call work is divided by the tokens of one call.
    (None, "generic") when the variant gives no count."""
    rule = variant_cls.added_macs
    if rule is None:
        return None, "generic"
    per_token = per_call = 0
    for t in targets:
        own = cfg.for_target(t.name) if hasattr(cfg, "for_target") else cfg
        tok, call = rule(t, own)
        per_token += tok
        per_call += call
    return per_token + per_call / tokens_per_call, "variant"


def variant_note(variant_cls, impl: str) -> str:
    """Why measured FLOPs may differ from 2 x the analytic MACs: the variant's ``cost_note``
    (lora-lite's side) or ``peft_cost_note`` (PEFT's implementation)."""
    note = variant_cls.cost_note if impl == "lora-lite" else variant_cls.peft_cost_note
    return note if isinstance(note, str) else ""


def peft_spec(variant_cls, cfg, target_names):
    """(PEFT config object, init callable or None) from the variant's ``peft_config`` and
    optional ``peft_init``; None when the variant has no PEFT counterpart. A variant whose
    exported form is not what a PEFT user trains (PiSSA exports a rank-2r LoRA relative to the
    original base; PEFT trains rank r on a rewritten base) says so with
    ``peft_training_config``, which the comparison then uses."""
    make = variant_cls.peft_training_config or variant_cls.peft_config
    content = make(cfg, list(target_names)) if make is not None else None
    if content is None:
        return None
    from peft import get_peft_config
    config = get_peft_config({"task_type": None, **content, "target_modules": list(target_names)})
    return config, variant_cls.peft_init


def generic_macs(model) -> float:
    """The generic rule for a variant without ``added_macs``: each 2-D adapter tensor once per
    token."""
    import lora_lite as ll
    return float(sum(t.numel() for t in ll.adapter_tensors(model).values() if t.dim() == 2))


# ---------------------------------------------------------------------------------------------
# Measuring (batches, timing, peak memory: lora_lite.testing.measure, shared with the benchmarks)
# ---------------------------------------------------------------------------------------------
class Runner:
    """Forward (no grad) and one training step (LM loss, backward, AdamW) of one model."""

    def __init__(self, model, params, batch, device):
        self.model, self.batch, self.device = model, batch, device
        self.params = list(params)
        # lr 0: the same arithmetic as a real step, but the weights stay as they are
        self.opt = torch.optim.AdamW(self.params, lr=0.0, weight_decay=0.0)

    def forward(self):
        self.model.eval()
        with torch.no_grad():
            self.model(**self.batch)

    def step(self):
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        out = self.model(**self.batch, labels=self.batch["input_ids"])
        out.loss.backward()
        self.opt.step()
        self.model.eval()

    def close(self):
        self.opt.zero_grad(set_to_none=True)
        self.opt.state.clear()
        for p in self.params:
            p.grad = None


def count_flops(model, batch) -> int | None:
    """FLOPs of one no-grad forward, by torch's FlopCounterMode (a matmul counts 2·m·k·n)."""
    from torch.utils.flop_counter import FlopCounterMode
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(**batch)
    except Exception:
        return None
    return int(counter.get_total_flops())


@dataclass
class Row:
    variant: str
    impl: str                       # "full FT", "lora-lite" or "peft"
    trainable: int | None = None
    targets: int | None = None
    macs_per_token: float | None = None     # analytic, added by the adapter
    macs_rule: str = ""
    flops_per_token: float | None = None    # measured (FlopCounterMode), added by the adapter
    flop_ratio: float | None = None         # flops_per_token / (2 * macs_per_token)
    fwd_ms: float | None = None
    step_ms: float | None = None
    step_ms_spread: tuple | None = None     # (min, max) of the timed steps
    peak_mb: float | None = None
    adapter_mb: float | None = None         # trainable tensors
    optimizer_mb: float | None = None       # AdamW state after a step
    activations_mb: float | None = None     # one step's peak above its start, minus gradients
    init_ms: float | None = None
    note: str = ""
    error: str | None = None

    def to_dict(self):
        return asdict(self)


@dataclass
class Settings:
    model: str
    batch: int = 2
    seq_len: int = 128
    repeats: int = 5
    warmup: int = 2
    device: str = "cpu"
    compare_peft: bool = False
    calib_batches: int = 4
    quantize: str | None = None     # the base's bitsandbytes layers: 4bit (nf4) or 8bit


@dataclass
class Report:
    settings: Settings
    memory_method: str
    rows: list[Row] = field(default_factory=list)
    ratios: list[dict] = field(default_factory=list)

    def to_dict(self):
        return {"settings": asdict(self.settings), "memory_method": self.memory_method,
                "conventions": CONVENTIONS, "rows": [r.to_dict() for r in self.rows],
                "ratios": self.ratios}


CONVENTIONS = (
    "MACs/tok: analytic multiply-accumulates added per token (per-call work spread over the "
    "batch's tokens). FLOPs/tok: measured by torch FlopCounterMode (a matmul counts 2 FLOPs per "
    "MAC), adapted minus base model. ratio = FLOPs / (2 x MACs): 1.00 = the count agrees. "
    "fwd/step: median ms after warm-up; step = forward + backward + AdamW step on an LM loss. "
    "peak: memory above the level before the row (attach/init + warm-up steps). init: attach "
    "time, one run.")


def _median(values):
    return statistics.median(values) if values else None


def _agreement(row: Row, n_tokens):
    if row.macs_per_token is None or row.flops_per_token is None:
        return
    if row.macs_per_token == 0:
        row.flop_ratio = None if row.flops_per_token == 0 else math.inf
    else:
        row.flop_ratio = row.flops_per_token / (2 * row.macs_per_token)


def _explain(row: Row, known: str):
    """The note: why measured and analytic differ (or nothing when they agree). ``known``: the
    variant's own note for this implementation."""
    if row.flops_per_token is None:
        return "FlopCounterMode failed on this model" + (f"; {known}" if known else "")
    if row.macs_per_token is None:
        return known
    agree = (row.flop_ratio is None and row.flops_per_token == 0) or \
        (row.flop_ratio is not None and abs(row.flop_ratio - 1) < 1e-3)
    parts = []
    if row.macs_rule == "generic" and row.impl == "lora-lite":
        parts.append("analytic by the generic rule (each 2-D adapter tensor once per token)")
    if agree:
        if known and row.macs_per_token == 0:
            parts.append(known)
        return "; ".join(parts)
    if known:
        parts.append(known)
    elif row.flop_ratio is not None and row.flop_ratio < 1:
        parts.append("the counter sees fewer matmul FLOPs than the math: part of the work is "
                     "elementwise or done by ops it does not count")
    else:
        parts.append("the forward does matmul work beyond the analytic count")
    return "; ".join(parts)


def tensor_mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def optimizer_state_mb(optimizer) -> float:
    return tensor_mb(v for state in optimizer.state.values() for v in state.values()
                     if torch.is_tensor(v))


class CostReport:
    """Measures rows on one base model that stays loaded (adapters attach/detach in place;
    PEFT wraps a deep copy)."""

    def __init__(self, model, settings: Settings, progress=None):
        self.model = model
        self.s = settings
        self.device = torch.device(settings.device)
        vocab = int(model.get_input_embeddings().weight.shape[0])
        self.batch = token_batch(vocab, settings.batch, settings.seq_len, 0, self.device)
        self.calibration = [token_batch(vocab, settings.batch, settings.seq_len, 100 + i,
                                        self.device) for i in range(settings.calib_batches)]
        self.n_tokens = settings.batch * settings.seq_len
        self.progress = progress or (lambda msg: None)
        self.report = Report(settings, PeakMemory.method(self.device))
        self.base_flops = None

    # -- rows ------------------------------------------------------------------------------
    def _settle(self, flags):
        """One untimed forward + backward before anything is measured, so one-time costs
        (thread pools, allocator arenas, lazy imports) are charged to no row."""
        if self.s.compare_peft:
            import peft  # noqa: F401  (importing PEFT is not part of its init time)
        self.model.train()
        self.model(**self.batch, labels=self.batch["input_ids"]).loss.backward()
        for p, _ in flags:
            p.grad = None
        self.model.eval()

    def base_row(self):
        """Full fine-tuning of every floating weight (on a quantized base the 4/8-bit weights
        cannot train: the row then trains the rest, embeddings, norms and head)."""
        self.progress("base model (full fine-tuning step)")
        model = self.model
        flags = [(p, p.requires_grad) for p in model.parameters() if p.is_floating_point()]
        for p, _ in flags:
            p.requires_grad_(True)
        self._settle(flags)
        row = Row("base", "full FT", trainable=sum(p.numel() for p, _ in flags),
                  macs_per_token=0.0, flops_per_token=0.0)
        try:
            with PeakMemory(self.device) as mem:
                runner = Runner(model, [p for p, _ in flags], self.batch, self.device)
                self._warm([runner])
            row.peak_mb = mem.peak_mb
            self._time_rows({"base": runner}, {"base": row})
            runner.close()
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
        self.base_flops = count_flops(model, self.batch)
        row.note = ("reference: full fine-tuning, every weight trainable" if not self.s.quantize
                    else f"reference: every floating weight trainable ({self.s.quantize} layers frozen)")
        self.report.rows.append(row)
        return row

    def variant_rows(self, variant: str, cfg):
        import lora_lite as ll
        variant_cls = ll.get_variant(variant)
        targets = ll.find_targets(self.model, cfg)
        spec = peft_spec(variant_cls, cfg, [t.name for t in targets]) if self.s.compare_peft else None
        calib = self.calibration if variant_cls.needs_calibration else None
        runners, rows, failed = {}, {}, []
        peft_model = None
        copy_for_peft = copy.deepcopy(self.model) if spec else None
        try:
            rows["lora-lite"] = self._lora_lite_row(variant, variant_cls, cfg, targets, calib,
                                                    runners)
            if spec:
                self.progress(f"{variant}: PEFT init + warm-up")
                prow = Row(variant, "peft", targets=len(targets))
                try:
                    peft_model = self._peft_row(prow, copy_for_peft, *spec, calib, runners)
                    rows["peft"] = prow
                except Exception as e:  # PEFT may not support a setting: keep our row
                    prow.error = f"{type(e).__name__}: {e}"
                    runners.pop("peft", None)
                    failed.append(prow)
            self.progress(f"{variant}: timing {' and '.join(runners)} interleaved")
            turns = self._time_rows(runners, rows)
            self.progress(f"{variant}: counting FLOPs")
            self._count_rows(variant_cls, rows, runners)
            self.report.rows.extend(rows.values())
            self.report.rows.extend(failed)
            if "peft" in rows:
                self.report.ratios.append(_ratios(rows["lora-lite"], rows["peft"], turns))
        finally:
            for runner in runners.values():
                runner.close()
            if ll.attached(self.model) is not None:
                ll.detach(self.model)
            del peft_model, copy_for_peft
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _lora_lite_row(self, variant, variant_cls, cfg, targets, calib, runners) -> Row:
        import lora_lite as ll
        self.progress(f"{variant}: lora-lite attach + warm-up")
        row = Row(variant, "lora-lite", targets=len(targets))
        with PeakMemory(self.device) as mem:
            start = time.perf_counter()
            ll.attach(self.model, cfg, calibration_data=calib)
            sync(self.device)
            row.init_ms = (time.perf_counter() - start) * 1e3
            params = ll.trainable_parameters(self.model)
            runners["lora-lite"] = Runner(self.model, params, self.batch, self.device)
            self._warm([runners["lora-lite"]])
        row.peak_mb = mem.peak_mb
        row.trainable = sum(p.numel() for p in params)
        row.macs_per_token, row.macs_rule = analytic_macs(variant_cls, ll.attached(self.model).targets,
                                                          cfg, self.n_tokens)
        if row.macs_per_token is None:
            row.macs_per_token = generic_macs(self.model)
        if calib is not None:
            row.note = f"init on {len(calib)} generated calibration batches"
        self._memory_split(row, runners["lora-lite"])
        return row

    def _peft_row(self, row, model_copy, peft_config, init, calib, runners):
        from peft import get_peft_model
        with PeakMemory(self.device) as mem:
            start = time.perf_counter()
            peft_model = get_peft_model(model_copy, peft_config)
            if init is not None:
                init(peft_model, calib if calib is not None else self.calibration)
            sync(self.device)
            row.init_ms = (time.perf_counter() - start) * 1e3
            params = [p for p in peft_model.parameters() if p.requires_grad]
            runners["peft"] = Runner(peft_model, params, self.batch, self.device)
            self._warm([runners["peft"]])
        row.peak_mb = mem.peak_mb
        row.trainable = sum(p.numel() for p in params)
        self._memory_split(row, runners["peft"])
        return peft_model

    def _memory_split(self, row, runner):
        """adapter tensors, AdamW state (after the warm-up steps) and one step's activations."""
        row.adapter_mb = tensor_mb(runner.params)
        row.optimizer_mb = optimizer_state_mb(runner.opt)
        with PeakMemory(self.device) as mem:
            runner.step()
        if mem.peak_mb is not None:  # the step's peak holds the gradients too
            row.activations_mb = max(mem.peak_mb - row.adapter_mb, 0.0)

    def _count_rows(self, variant_cls, rows, runners):
        ours = rows["lora-lite"]
        for impl, r in rows.items():
            flops = count_flops(runners[impl].model, self.batch)
            if flops is not None and self.base_flops is not None:
                r.flops_per_token = (flops - self.base_flops) / self.n_tokens
            if impl == "peft":  # the same math, so the same analytic count
                r.macs_per_token, r.macs_rule = ours.macs_per_token, ours.macs_rule
            _agreement(r, self.n_tokens)
            r.note = "; ".join(x for x in (r.note, _explain(r, variant_note(variant_cls, impl))) if x)

    def failed_row(self, variant, impl, error):
        self.report.rows.append(Row(variant, impl, error=error))

    # -- timing ----------------------------------------------------------------------------
    def _warm(self, runners):
        for _ in range(self.s.warmup):
            for r in runners:
                r.forward()
                r.step()

    def _time_rows(self, runners: dict, rows: dict) -> dict:
        """Time the runners taking turns (one forward of each, then one step of each, repeated),
        rotating which goes first (``lora_lite.testing.measure.interleaved``; with lora-lite always
        first, LoRA's step ratio read 1.03 in three runs of identical work): each row gets its
        medians and its step-time spread; returns the per-turn times (ms)."""
        phases = {"fwd": {k: r.forward for k, r in runners.items()},
                  "step": {k: r.step for k, r in runners.items()}}
        times = interleaved(phases, self.s.repeats, self.device)
        fwd, step = ({k: [s * 1e3 for s in times[phase][k]["wall"]] for k in runners} for phase in ("fwd", "step"))
        for k in runners:
            rows[k].fwd_ms, rows[k].step_ms = _median(fwd[k]), _median(step[k])
            rows[k].step_ms_spread = (min(step[k]), max(step[k]))
        return {"fwd": fwd, "step": step}


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def _paired(turns, kind) -> tuple:
    """(median, min, max) of lora-lite / PEFT over the interleaved turns."""
    pairs = [a / b for a, b in zip(turns[kind]["lora-lite"], turns[kind]["peft"], strict=True) if b > 0]
    if not pairs:
        return None, None, None
    return _median(pairs), min(pairs), max(pairs)


def _ratios(ours: Row, peft: Row, turns) -> dict:
    step_med, step_lo, step_hi = _paired(turns, "step")
    fwd_med, fwd_lo, fwd_hi = _paired(turns, "fwd")
    return {"variant": ours.variant,
            "trainable": _ratio(ours.trainable, peft.trainable),
            "flops_per_token": _ratio(ours.flops_per_token, peft.flops_per_token),
            "fwd_ms": fwd_med, "fwd_ms_range": [fwd_lo, fwd_hi],
            "step_ms": step_med, "step_ms_range": [step_lo, step_hi],
            "peak_mb": _ratio(ours.peak_mb, peft.peak_mb),
            "memory_mb": _ratio(_total_mb(ours), _total_mb(peft)),
            "init_ms": _ratio(ours.init_ms, peft.init_ms)}


def _total_mb(row: Row):
    parts = (row.adapter_mb, row.optimizer_mb, row.activations_mb)
    return None if any(p is None for p in parts) else sum(parts)
