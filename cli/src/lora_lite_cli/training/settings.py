"""What defines a training run: the settings, their checks, and the variant's own defaults.

The defaults come from the variant (its optional ``train_defaults``, see
``lora_lite_cli.defaults``); every option the user gives wins over them. A resumed run takes the
settings stored in its checkpoint; only the options in ``RESUME_FREE`` may differ.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass, field

from .. import data as data_mod
from .. import options
from ..configs import parse_layers, parse_sets
from ..defaults import variant_defaults
from ..errors import CLIError
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


def _flag(default=dataclasses.MISSING, *decls, help="", shown=None, option=None, parse=None,
          factory=dataclasses.MISSING, cli_type=None):
    """A Settings field that is also a ``lora-lite train`` option (see ``commands.settings_options``).

    decls: the flag and its short alias; help: its text, to which "(default: X)." is added, X the
    field's default, or ``shown`` when given (``shown=False``: the help says it all); option: an
    ``options.*_option`` maker used as is; parse: the option's value -> the setting's value; cli_type:
    the option's type when not the field's."""
    meta = {"decls": decls, "help": help, "shown": shown, "option": option, "parse": parse,
            "cli_type": cli_type}
    return field(default=default, default_factory=factory, metadata={"cli": meta})


def _app_option(name, *args):
    return functools.partial(getattr(options, name), *args)


def _parse_sets(pairs):
    return parse_sets(pairs) if pairs else None


def _tuple(values):
    return tuple(values) if values else None


@dataclass
class Settings:
    """Everything that defines a run (stored in metrics.json and in checkpoints). A field with
    ``_flag`` metadata is a ``lora-lite train`` option, generated from it (the single source)."""

    variant: str
    model: str = _flag(DEFAULT_MODEL, option=_app_option("model_option"))
    train_data: str = _flag(data_mod.GENERATED, "--train-data", shown=False, help=(
        "'generated' (default: built-in arithmetic problems), a .jsonl file, a dataset folder or a hub dataset "
        "NAME, NAME:CONFIG or NAME:CONFIG@SPLIT, e.g. meta-math/MetaMathQA."))
    eval_data: str = _flag(data_mod.GENERATED, "--eval-data", shown=False, help=(
        "'generated' (the fixed held-out split), a .jsonl file, a dataset folder or a hub dataset, e.g. "
        "openai/gsm8k."))
    # qa, chat, alpaca, prompt_completion, text (None: detected)
    data_format: str | None = _flag(None, "--data-format", shown="detected from the fields", help=(
        "Format of the data files: qa, chat, alpaca, prompt_completion or text"))
    # completion (paired data: not the prompt) or all
    loss_on: str = _flag("completion", "--loss-on", help=(
        "completion: train on the completion / assistant turns only; all: on the prompt too"))
    # numeric, exact or loss (None: by the eval data's format)
    metric: str | None = _flag(None, "--metric", shown="numeric for question/answer data, else loss", help=(
        "Evaluation: numeric (the answer's number), exact (the completion) or loss (held-out loss, perplexity)"))
    pack: bool = _flag(False, "--pack", shown=False, help=(
        "Pack training examples into rows of --seq-len tokens (labels masked per example)."))
    steps: int = _flag(80, "--steps", help="Optimizer steps")
    batch_size: int = _flag(8, "--batch-size", "-b", help="Examples per micro-batch, over all processes")
    grad_accum: int = _flag(1, "--grad-accum", help="Micro-batches per optimizer step")
    lr: float = _flag(2e-3, "--lr", shown="the variant's own, see `lora-lite variants --json`",
                      help="Peak learning rate")
    schedule: str = _flag("cosine", "--schedule", help="LR schedule: cosine, linear or constant")
    warmup: int = _flag(0, "--warmup", help="Linear warm-up steps")
    weight_decay: float = _flag(0.0, "--weight-decay", help="AdamW weight decay")
    grad_clip: float = _flag(1.0, "--grad-clip", help="Clip the adapter gradient norm, 0 for no clipping")
    seq_len: int = _flag(256, "--seq-len", help="Truncate training examples to this many tokens")
    targets: tuple = _flag((), option=_app_option("targets_option"), parse=_tuple)
    layers: tuple | None = _flag(None, option=_app_option("layers_option"), parse=parse_layers,
                                cli_type=str)
    rank: int = _flag(8, option=_app_option("rank_option"))
    alpha: float = _flag(16.0, "--alpha", shown="per variant, 16", help="Scale numerator, s = alpha / r")
    knobs: dict = _flag(option=_app_option("sets_option"), parse=_parse_sets, factory=dict)
    dtype: str = _flag("float32", option=_app_option("dtype_option", None))  # the base model's storage dtype
    # autocast of the forward: no, bf16, fp16 (+ loss scaler)
    mixed_precision: str = _flag("no", "--mixed-precision", help=(
        "Autocast the forward: no, bf16 or fp16 (fp16: CUDA only, with a loss scaler); the adapter's master "
        "weights stay float32"))
    compile: bool = _flag(False, "--compile", shown=False, help="torch.compile the adapted model for training.")
    gradient_checkpointing: bool = _flag(False, "--gradient-checkpointing", shown=False, help=(
        "Recompute each block's activations in the backward pass (less activation memory, more compute; the same "
        "loss and gradients)."))
    quantize: str | None = _flag(None, option=_app_option("quantize_option"))
    seed: int = _flag(0, "--seed", help="Seed of data order/generation and adapter init")
    calibration: int = _flag(0, "--calibration-batches", shown="per variant", help=(
        "Training micro-batches given to data-initialised variants at attach"))
    eval_limit: int = _flag(100, "--eval-limit", help=(
        "Evaluate on the first N held-out items, 0 to skip evaluation"))
    eval_batch_size: int = _flag(50, "--eval-batch-size", help="Prompts per generation batch")
    max_new_tokens: int = _flag(32, "--max-new-tokens", help="Generation budget per answer")
    device: str = _flag("cpu", "--device", help="cpu, cuda or auto")
    threads: int | None = _flag(None, option=_app_option("threads_option"))
    output: str = _flag("", "--output", "-o", shown="lora-lite-runs/<model>__<variant>__s<steps>__seed<seed>",
                        help="Run folder", parse=lambda p: str(p) if p else None)

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
    from ..configs import build_config as cli_build_config
    return cli_build_config(s.variant, targets=list(s.targets), rank=s.rank, alpha=float(s.alpha),
                            layers=s.layers, dtype="float32", sets=dict(s.knobs), seed=s.seed)
