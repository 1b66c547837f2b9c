"""What defines a training run: the settings, their checks, and the variant's own defaults.

The defaults come from the variant (its optional ``train_defaults``, see
``lora_lite_cli.defaults``); every option the user gives wins over them. A resumed run takes the
settings stored in its checkpoint; only the options in ``RESUME_FREE`` may differ.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from .. import data as data_mod
from ..app import CLIError
from ..defaults import variant_defaults
from ..models import DEFAULT_MODEL

SCHEDULES = ("cosine", "linear", "constant")
MIXED_PRECISION = ("no", "bf16", "fp16")
DTYPES = ("float32", "bfloat16", "float16")
# options that may differ from the checkpoint's when resuming (they do not change the training)
RESUME_FREE = {"output", "eval_limit", "eval_batch_size", "max_new_tokens", "device", "threads",
               "metric"}


class TrainError(CLIError):
    """Stops a run with a one-line message and an exit code (2: bad input, by default)."""

    def __init__(self, message, code=2):
        super().__init__(message, code)


@dataclass
class Settings:
    """Everything that defines a run (stored in metrics.json and in checkpoints)."""

    variant: str
    model: str = DEFAULT_MODEL
    train_data: str = data_mod.GENERATED
    eval_data: str = data_mod.GENERATED
    data_format: str | None = None    # qa, chat, alpaca, prompt_completion, text (None: detected)
    loss_on: str = "completion"       # completion (paired data: not the prompt) or all
    metric: str | None = None         # numeric, exact or loss (None: by the eval data's format)
    pack: bool = False                # pack training examples into rows of seq_len tokens
    steps: int = 80
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-3
    schedule: str = "cosine"
    warmup: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seq_len: int = 256
    targets: tuple = ()
    layers: tuple | None = None
    rank: int = 8
    alpha: float = 16.0
    knobs: dict = field(default_factory=dict)
    dtype: str = "float32"            # the base model's storage dtype
    mixed_precision: str = "no"       # autocast of the forward: no, bf16, fp16 (+ loss scaler)
    compile: bool = False             # torch.compile the adapted model for training
    gradient_checkpointing: bool = False  # recompute each block's activations in backward
    quantize: str | None = None
    seed: int = 0
    calibration: int = 0
    eval_limit: int = 100
    eval_batch_size: int = 50
    max_new_tokens: int = 32
    device: str = "cpu"
    threads: int | None = None
    output: str = ""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, saved: dict) -> Settings:
        """Settings stored by ``to_dict`` (a checkpoint); unknown keys refused, missing keys
        take today's defaults (a checkpoint of an older version)."""
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(saved, dict) or "variant" not in saved:
            raise TrainError("the checkpoint's settings are not a settings record")
        unknown = sorted(set(saved) - names)
        if unknown:
            raise TrainError(f"the checkpoint's settings have unknown keys {unknown}")
        values = dict(saved)
        values["targets"] = tuple(values.get("targets") or ())
        if values.get("layers") is not None:
            values["layers"] = tuple(values["layers"])
        return cls(**values)


def resolve_settings(variant: str, given: dict) -> Settings:
    """Settings from the variant's defaults, then every option the user gave (not None)."""
    row = variant_defaults(variant)
    values = {k: v for k, v in given.items() if v is not None}
    knobs = dict(row.get("knobs", {}))
    knobs.update(values.pop("knobs", {}) or {})
    s = Settings(variant=variant, knobs=knobs)
    for key in ("lr", "rank", "alpha", "targets", "calibration"):
        setattr(s, key, row[key])
    for key, value in values.items():
        if not hasattr(s, key):
            raise TypeError(f"unknown setting {key!r}")
        setattr(s, key, value)
    if s.alpha == "r":
        s.alpha = float(s.rank)
    s.targets = tuple(s.targets)
    if s.layers is not None:
        s.layers = tuple(s.layers)
    if not s.output:
        short = os.path.basename(os.path.normpath(s.model)).removesuffix(".gguf") or "model"
        s.output = os.path.join("lora-lite-runs", f"{short}__{variant.replace(':', '+')}__s{s.steps}__seed{s.seed}")
    s.output = os.path.abspath(s.output)  # a checkpoint resumes into this folder from anywhere
    check_settings(s)
    return s


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_settings(s: Settings) -> None:
    """One TrainError (exit 2) naming the first bad option, before anything is loaded."""
    def need(ok, option, value, expected):
        if not ok:
            raise TrainError(f"{option} {value!r}: expected {expected}")
    need(s.steps >= 1, "--steps", s.steps, "at least 1")
    need(s.batch_size >= 1, "--batch-size", s.batch_size, "at least 1")
    need(s.grad_accum >= 1, "--grad-accum", s.grad_accum, "at least 1")
    need(_finite(s.lr) and s.lr > 0, "--lr", s.lr, "a finite positive learning rate")
    need(s.schedule in SCHEDULES, "--schedule", s.schedule, f"one of {', '.join(SCHEDULES)}")
    need(0 <= s.warmup < s.steps, "--warmup", s.warmup, "between 0 and steps - 1")
    need(_finite(s.weight_decay) and s.weight_decay >= 0, "--weight-decay", s.weight_decay,
         "0 or a finite positive number")
    need(_finite(s.grad_clip) and s.grad_clip >= 0, "--grad-clip", s.grad_clip,
         "0 (off) or a finite positive norm")
    need(s.seq_len >= 8, "--seq-len", s.seq_len, "at least 8")
    need(s.eval_limit >= 0, "--eval-limit", s.eval_limit, "0 (no evaluation) or more")
    need(s.eval_batch_size >= 1, "--eval-batch-size", s.eval_batch_size, "at least 1")
    need(s.max_new_tokens >= 1, "--max-new-tokens", s.max_new_tokens, "at least 1")
    need(s.threads is None or s.threads >= 1, "--threads", s.threads,
         "at least 1 (leave it out to use the idle cores)")
    need(s.calibration >= 0, "--calibration-batches", s.calibration, "0 or more")
    need(s.dtype in DTYPES, "--dtype", s.dtype, f"one of {', '.join(DTYPES)}")
    need(s.mixed_precision in MIXED_PRECISION, "--mixed-precision", s.mixed_precision,
         f"one of {', '.join(MIXED_PRECISION)}")
    need(s.quantize in (None, "4bit", "8bit"), "--quantize", s.quantize, "4bit or 8bit")
    need(s.data_format in (None, *data_mod.FORMATS), "--data-format", s.data_format,
         f"one of {', '.join(data_mod.FORMATS)}")
    need(s.loss_on in ("completion", "all"), "--loss-on", s.loss_on, "completion or all")
    need(s.metric in (None, *data_mod.METRICS), "--metric", s.metric,
         f"one of {', '.join(data_mod.METRICS)}")


def build_config(s: Settings):
    """The variant's typed config from the settings; --set knobs are typed from the config's
    fields (a bad knob or value is a ConfigError naming it). The adapter's own tensors are
    always float32 (the master weights), whatever the base's ``--dtype``: in fp16, AdamW's eps
    (1e-8) underflows to 0 and the first update is non-finite."""
    from ..app import build_config as cli_build_config
    return cli_build_config(s.variant, targets=list(s.targets), rank=s.rank, alpha=float(s.alpha),
                            layers=s.layers, dtype="float32", sets=dict(s.knobs), seed=s.seed)
