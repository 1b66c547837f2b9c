"""What an adapter costs: parameters, added compute, time, memory, init time (``cost-report``).

Conventions (upstream's report got the first one wrong, variants.md §9.3):

* A MAC is one multiply-accumulate. ``torch.utils.flop_counter.FlopCounterMode`` counts a
  matmul of (m×k)·(k×n) as 2·m·k·n FLOPs, so measured added FLOPs per token should equal
  **2 ×** the analytic added MACs per token. The report shows both and their ratio
  ``measured FLOPs / (2 × analytic MACs)``: 1.00 means the count is right. The counter sees only
  matmul-like ops (mm, bmm, addmm, einsum, sdpa), not elementwise work (IA3's gains, RoAd's
  rotations, norms) nor linear solves.
* Analytic MACs come from each variant's math in terms of its tensor shapes (``ANALYTIC``).
  Work done once per forward call (e.g. DoRA's B·A for the weight norm) is spread over the
  batch's tokens (batch × seq-len) and said so. A variant not in the table (a third party's)
  gets the generic rule: every 2-D adapter tensor is used once per token in a matmul.
* Time: median over ``repeats`` runs after ``warmup`` runs; lora-lite and PEFT rows of one
  variant are timed interleaved (one run of each in turn) so machine noise hits both alike.
* Memory: the peak above what was held just before the row's window (attach/init + warm-up
  forward and training steps: adapter tensors, optimizer state, activations, gradients).
  CUDA: ``torch.cuda.max_memory_allocated``. CPU: the process's peak resident set (Linux
  VmHWM, reset through /proc/self/clear_refs; glibc's mmap threshold is pinned at 1 MiB so
  freed tensors go back to the OS and the baseline is honest).

Variant-specific knowledge lives only in the tables ``ANALYTIC``, ``NOTES``, ``PEFT_EQUIVALENT``.
"""
from __future__ import annotations

import copy
import ctypes
import gc
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

# ---------------------------------------------------------------------------------------------
# The one place with variant-specific knowledge.
# ANALYTIC[variant](target, cfg) -> (MACs per token, MACs per forward call) for one target layer.
# ---------------------------------------------------------------------------------------------


def _low_rank(t, cfg):  # x Aᵀ (r·d_in) then · Bᵀ (d_out·r)
    return cfg.r * (t.d_in + t.d_out)


def _pissa(t, cfg):  # rewrite_base=False keeps W and subtracts s·B0A0 x in the hook: twice
    return _low_rank(t, cfg) * (1 if getattr(cfg, "rewrite_base", True) else 2), 0


def _antipasto_rot(t, cfg):
    bs = getattr(cfg, "block_size", 4)
    sides = {"none": 0, "V": 1, "U": 1, "both": 2}.get(getattr(cfg, "rotate_basis", "V"), 1)
    return _low_rank(t, cfg) + sides * cfg.r * bs, 0  # block rotations on the r coordinates


ANALYTIC = {
    "lora": lambda t, cfg: (_low_rank(t, cfg), 0),
    "eva": lambda t, cfg: (_low_rank(t, cfg), 0),
    "pissa": _pissa,
    "delora": lambda t, cfg: (_low_rank(t, cfg), 0),
    # DoRA: the LoRA path per token, and B·A once per call for the norm of W + s·B·A
    "dora": lambda t, cfg: (_low_rank(t, cfg), t.d_out * cfg.r * t.d_in),
    "ia3": lambda t, cfg: (0, 0),
    "ia3_ff": lambda t, cfg: (0, 0),
    "road": lambda t, cfg: (0, 0),
    # r reflections x <- x - 2 (x·v) v: a dot and an axpy of d_in each
    "hra": lambda t, cfg: (2 * cfg.r * t.d_in, 0),
    "vera": lambda t, cfg: (_low_rank(t, cfg), 0),
    "lora_xs": lambda t, cfg: (_low_rank(t, cfg) + cfg.r * cfg.r, 0),
    "antipasto": lambda t, cfg: (_low_rank(t, cfg), 0),
    "antipasto_corda": lambda t, cfg: (_low_rank(t, cfg), 0),
    "antipasto_asvd": lambda t, cfg: (_low_rank(t, cfg), 0),
    "antipasto_rot": _antipasto_rot,
    "antipasto_arrow": lambda t, cfg: (_low_rank(t, cfg) + getattr(cfg, "block", 8) ** 2, 0),
    "antipasto_dplr": lambda t, cfg: (_low_rank(t, cfg) + 2 * cfg.r * getattr(cfg, "lora_rank", 8), 0),
    "antipasto_ablate": lambda t, cfg: (_low_rank(t, cfg) + 2 * cfg.r * getattr(cfg, "k", 1), 0),
}

# Why the measured FLOPs may differ from 2 × analytic MACs (shown when they do).
NOTES = {
    ("lora-lite", "ia3"): "elementwise gain only (d_out mults/token): no matmul, nothing to count",
    ("lora-lite", "ia3_ff"): "elementwise gain only (d_in mults/token): no matmul",
    ("lora-lite", "road"): "elementwise 2-D rotations only: no matmul",
    ("lora-lite", "hra"): "computed in compact-WY form: (x Vᵀ) K adds r² MACs/token, and "
                          "V Vᵀ (r²·d_in) and K (~r³) are built once per call",
    ("lora-lite", "dora"): "B·A (d_out·r·d_in) once per call, spread over the batch's tokens; "
                           "the row norms are elementwise",
    ("lora-lite", "antipasto_rot"): "the Cayley solves (once per call) are linear solves, not "
                                    "counted",
    ("peft", "hra"): "PEFT builds the d_in×d_in product of reflections and W·R on every call",
    ("peft", "dora"): "PEFT's DoRA also forms B·A (and W + s·B·A) once per call",
    ("peft", "vera"): "PEFT slices the shared A/B to each layer's shape",
    ("peft", "road"): "elementwise rotations only",
    ("peft", "ia3"): "elementwise gain only",
    ("peft", "ia3_ff"): "elementwise gain only",
    ("peft", "delora"): "PEFT's DeLoRA forward",
}


def _peft_lora(cfg, names, **extra):
    from peft import LoraConfig
    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=names, lora_dropout=0.0,
                      bias="none", **extra)


def _peft_eva(cfg, names):
    from peft import EvaConfig
    return _peft_lora(cfg, names, init_lora_weights="eva", eva_config=EvaConfig(rho=1.0))


def _peft_ia3(cfg, names, feedforward):
    from peft import IA3Config
    return IA3Config(target_modules=names, feedforward_modules=names if feedforward else [])


def _peft_delora(cfg, names):
    from peft import DeloraConfig
    return DeloraConfig(r=cfg.r, delora_lambda=getattr(cfg, "lambda0", 15.0), target_modules=names)


def _peft_hra(cfg, names):
    from peft import HRAConfig
    return HRAConfig(r=cfg.r, target_modules=names)


def _peft_road(cfg, names):
    from peft import RoadConfig
    return RoadConfig(variant=getattr(cfg, "road_variant", "road_1"),
                      group_size=getattr(cfg, "group_size", 64), target_modules=names)


def _peft_vera(cfg, names):
    from peft import VeraConfig
    return VeraConfig(r=cfg.r, target_modules=names, vera_dropout=0.0,
                      projection_prng_key=getattr(cfg, "projection_seed", 0),
                      d_initial=getattr(cfg, "d_initial", 0.1))


def _eva_init(peft_model, calibration):
    from peft import initialize_lora_eva_weights
    initialize_lora_eva_weights(peft_model, dataloader=calibration, show_progress_bar=False)


# variant -> (PEFT config from (lora-lite cfg, exact target names), optional init after wrapping)
PEFT_EQUIVALENT = {
    "lora": (lambda cfg, names: _peft_lora(cfg, names), None),
    "pissa": (lambda cfg, names: _peft_lora(cfg, names, init_lora_weights="pissa"), None),
    "dora": (lambda cfg, names: _peft_lora(cfg, names, use_dora=True), None),
    "eva": (_peft_eva, _eva_init),
    "delora": (_peft_delora, None),
    "ia3": (lambda cfg, names: _peft_ia3(cfg, names, False), None),
    "ia3_ff": (lambda cfg, names: _peft_ia3(cfg, names, True), None),
    "hra": (_peft_hra, None),
    "road": (_peft_road, None),
    "vera": (_peft_vera, None),
}


def analytic_macs(variant: str, targets, cfg, tokens_per_call: int) -> tuple[float, str]:
    """(added MACs per token over all targets, rule used). Per-call work is divided by the
    tokens of one forward call."""
    rule = ANALYTIC.get(variant)
    if rule is None:   # the variant's own count (the shared contract's added_macs)
        import lora_lite as ll
        rule = getattr(ll.variants().get(variant), "added_macs", None)
    if rule is None:
        return None, "generic"
    per_token = per_call = 0
    for t in targets:
        tok, call = rule(t, cfg)
        per_token += tok
        per_call += call
    return per_token + per_call / tokens_per_call, "table"


def generic_macs(model) -> float:
    """The generic rule for variants not in ANALYTIC: each 2-D adapter tensor once per token."""
    import lora_lite as ll
    return float(sum(t.numel() for t in ll.adapter_tensors(model).values() if t.dim() == 2))


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


class PeakMemory:
    """Peak memory above the level at entry, over a ``with`` window.

    CUDA: max_memory_allocated. CPU on Linux: the process's peak RSS (VmHWM after a reset
    through /proc/self/clear_refs). Elsewhere: None.
    """

    _pinned = False

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak_mb = None

    @classmethod
    def method(cls, device) -> str:
        if torch.device(device).type == "cuda":
            return "CUDA max_memory_allocated above the level before the window"
        if cls._can_reset_rss():
            return "process peak RSS (VmHWM) above the RSS before the window"
        return "unavailable on this platform"

    @staticmethod
    def _can_reset_rss():
        return os.path.exists("/proc/self/clear_refs") and os.access("/proc/self/clear_refs", os.W_OK)

    @classmethod
    def _pin_malloc(cls):
        """Large blocks always mmapped (so free returns them to the OS): an honest RSS baseline."""
        if cls._pinned:
            return
        cls._pinned = True
        libc = _libc()
        if libc is not None and hasattr(libc, "mallopt"):
            M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
            libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
            libc.mallopt(M_TRIM_THRESHOLD, 1 << 20)

    @staticmethod
    def _status_kb(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        return None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self._can_reset_rss():
            self._pin_malloc()
            libc = _libc()
            if libc is not None and hasattr(libc, "malloc_trim"):
                libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
            self._base = self._status_kb("VmRSS") * 1024
        else:
            self._base = None
        return self

    def __exit__(self, *exc):
        if self._base is None:
            return False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = self._status_kb("VmHWM") * 1024
        self.peak_mb = max(peak - self._base, 0) / 2**20
        return False


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


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

    def timed(self, fn) -> float:
        _sync(self.device)
        start = time.perf_counter()
        fn()
        _sync(self.device)
        return (time.perf_counter() - start) * 1e3


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
    peak_mb: float | None = None
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


def token_batch(vocab: int, batch: int, seq: int, seed: int, device) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids.to(device),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device)}


def _median(values):
    return statistics.median(values) if values else None


def _agreement(row: Row, n_tokens):
    if row.macs_per_token is None or row.flops_per_token is None:
        return
    if row.macs_per_token == 0:
        row.flop_ratio = None if row.flops_per_token == 0 else math.inf
    else:
        row.flop_ratio = row.flops_per_token / (2 * row.macs_per_token)


def _own_note(row: Row) -> str:
    """The variant's own cost_note (lora-lite) / peft_cost_note (peft), if it states one."""
    import lora_lite as ll
    cls = ll.variants().get(row.variant)
    return getattr(cls, "cost_note" if row.impl == "lora-lite" else "peft_cost_note", "") or ""


def peft_equivalent(variant: str, cfg):
    """(PEFT config builder, optional init) from the table, else from the variant's own
    peft_config (+ peft_init); None where PEFT has no such method (peft_config gives None)."""
    if variant in PEFT_EQUIVALENT:
        return PEFT_EQUIVALENT[variant]
    import lora_lite as ll
    cls = ll.variants().get(variant)
    own = getattr(cls, "peft_config", None)
    if not callable(own) or own(cfg, []) is None:
        return None

    def make(cfg, names):
        import peft
        return peft.get_peft_config(own(cfg, names))
    return make, getattr(cls, "peft_init", None)


def _explain(row: Row):
    """The note: why measured and analytic differ (or nothing when they agree)."""
    known = NOTES.get((row.impl, row.variant), "") or _own_note(row)
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
        self.progress("base model (full fine-tuning step)")
        model = self.model
        flags = [(p, p.requires_grad) for p in model.parameters()]
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
            times = self._time({"base": runner})
            row.fwd_ms, row.step_ms = times["base"]
            runner.close()
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
        self.base_flops = count_flops(model, self.batch)
        row.note = "reference: full fine-tuning, every weight trainable"
        self.report.rows.append(row)
        return row

    def variant_rows(self, variant: str, cfg):
        import lora_lite as ll
        targets = ll.find_targets(self.model, cfg)
        peft_spec = peft_equivalent(variant, cfg) if self.s.compare_peft else None
        calib = self.calibration if getattr(ll.get_variant(variant), "needs_calibration", False) \
            else None
        runners = {}
        peft_model = None
        copy_for_peft = copy.deepcopy(self.model) if peft_spec else None
        try:
            self.progress(f"{variant}: lora-lite attach + warm-up")
            row = Row(variant, "lora-lite", targets=len(targets))
            rows = {"lora-lite": row}
            with PeakMemory(self.device) as mem:
                start = time.perf_counter()
                ll.attach(self.model, cfg, calibration_data=calib)
                _sync(self.device)
                row.init_ms = (time.perf_counter() - start) * 1e3
                runners["lora-lite"] = Runner(self.model, ll.trainable_parameters(self.model),
                                              self.batch, self.device)
                self._warm([runners["lora-lite"]])
            row.peak_mb = mem.peak_mb
            row.trainable = sum(p.numel() for p in ll.trainable_parameters(self.model))
            row.macs_per_token, row.macs_rule = analytic_macs(variant, targets, cfg, self.n_tokens)
            if row.macs_per_token is None:
                row.macs_per_token = generic_macs(self.model)
            if calib is not None:
                row.note = f"init on {len(calib)} generated calibration batches"
            failed = []
            if peft_spec:
                make_config, after = peft_spec
                self.progress(f"{variant}: PEFT init + warm-up")
                prow = Row(variant, "peft", targets=len(targets))
                try:
                    peft_model = self._peft_row(prow, copy_for_peft,
                                                make_config(cfg, [t.name for t in targets]),
                                                after, calib, runners)
                    rows["peft"] = prow
                except Exception as e:  # PEFT may not support a setting: keep our row
                    prow.error = f"{type(e).__name__}: {e}"
                    runners.pop("peft", None)
                    failed.append(prow)
            self.progress(f"{variant}: timing {' and '.join(runners)} interleaved")
            times = self._time(runners)
            for impl, (fwd, step) in times.items():
                rows[impl].fwd_ms, rows[impl].step_ms = fwd, step
            self.progress(f"{variant}: counting FLOPs")
            for impl, r in rows.items():
                flops = count_flops(runners[impl].model, self.batch)
                if flops is not None and self.base_flops is not None:
                    r.flops_per_token = (flops - self.base_flops) / self.n_tokens
                if impl == "peft":  # the same math, so the same analytic count
                    r.macs_per_token, r.macs_rule = row.macs_per_token, row.macs_rule
                _agreement(r, self.n_tokens)
                r.note = "; ".join(x for x in (r.note, _explain(r)) if x)
            self.report.rows.extend(rows.values())
            self.report.rows.extend(failed)
            if "peft" in rows:
                self.report.ratios.append(_ratios(row, rows["peft"]))
        finally:
            for runner in runners.values():
                runner.close()
            if ll.attached(self.model) is not None:
                ll.detach(self.model)
            del peft_model, copy_for_peft
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _peft_row(self, row, model_copy, peft_config, after, calib, runners):
        from peft import get_peft_model
        with PeakMemory(self.device) as mem:
            start = time.perf_counter()
            peft_model = get_peft_model(model_copy, peft_config)
            if after is not None:
                after(peft_model, calib if calib is not None else self.calibration)
            _sync(self.device)
            row.init_ms = (time.perf_counter() - start) * 1e3
            params = [p for p in peft_model.parameters() if p.requires_grad]
            runners["peft"] = Runner(peft_model, params, self.batch, self.device)
            self._warm([runners["peft"]])
        row.peak_mb = mem.peak_mb
        row.trainable = sum(p.numel() for p in params)
        return peft_model

    def failed_row(self, variant, impl, error):
        self.report.rows.append(Row(variant, impl, error=error))

    # -- timing ----------------------------------------------------------------------------
    def _warm(self, runners):
        for _ in range(self.s.warmup):
            for r in runners:
                r.forward()
                r.step()

    def _time(self, runners: dict) -> dict:
        """{name: (median forward ms, median step ms)}, the runners taking turns."""
        fwd = {k: [] for k in runners}
        step = {k: [] for k in runners}
        for _ in range(self.s.repeats):
            for k, r in runners.items():
                fwd[k].append(r.timed(r.forward))
            for k, r in runners.items():
                step[k].append(r.timed(r.step))
        return {k: (_median(fwd[k]), _median(step[k])) for k in runners}


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def _ratios(ours: Row, peft: Row) -> dict:
    return {"variant": ours.variant,
            "trainable": _ratio(ours.trainable, peft.trainable),
            "flops_per_token": _ratio(ours.flops_per_token, peft.flops_per_token),
            "fwd_ms": _ratio(ours.fwd_ms, peft.fwd_ms),
            "step_ms": _ratio(ours.step_ms, peft.step_ms),
            "peak_mb": _ratio(ours.peak_mb, peft.peak_mb),
            "init_ms": _ratio(ours.init_ms, peft.init_ms)}
