"""The training run behind ``lora-lite train``: settings, per-variant defaults, the loop.

One run: load the model, evaluate the base model on the held-out split, attach the adapter
(calibrating from the first training batches when the variant needs data), train the adapter
tensors with AdamW, save the adapter, check that it reloads, evaluate the adapted model, and
write ``adapter.safetensors``, ``metrics.json``, ``predictions.jsonl`` and ``loss.png``.

The loss of an optimizer step is the mean over every supervised token of the step (all
micro-batches, all processes), so gradient accumulation and the number of processes do not
change the result. Under ``torchrun`` (WORLD_SIZE > 1) each process takes a strided share of
every micro-batch and the adapter gradients are summed with one all-reduce per step; only rank 0
writes files and draws the progress bar.

Sanity figures (variants.md section 5.4): the first step's gradient norm summed over adapter
tensors (> 0), the adapter delta (sum of Frobenius norms of after - before, > 0) and the number
of base-parameter gradients seen over all steps (must be 0).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import resource
import time
from dataclasses import dataclass, field

import torch

import lora_lite as ll

from . import data as data_mod
from . import evaluate as eval_mod
from .models import DEFAULT_MODEL, describe, load_model

# -- per-variant defaults ------------------------------------------------------------------------
# Sized for the default run (SmolLM2-135M, generated problems, 80 steps x batch 8, 2 CPU cores).
# "*" applies to every variant; a variant's own row overrides it. Rank and alpha default to the
# variant config's own defaults (antipasto's r = 128, VeRA's r = 256, 8 and 16 elsewhere), and
# targets to the config's own target_names when it has some (ia3: k/v, ia3_ff: down_proj).
# alpha="r" means alpha = r. calibration: how many training micro-batches a data-initialised
# variant gets at attach. knobs: values for the variant's own config fields (--set wins).
VARIANT_DEFAULTS: dict[str, dict] = {
    "*": dict(lr=2e-3, targets=(r"(q_proj|v_proj)$",), calibration=0),
    "lora": {},
    "pissa": dict(alpha="r"),            # PiSSA's scale is 1: its factors carry W's top-r part
    "dora": {},
    "delora": dict(lr=1e-3),
    "eva": dict(calibration=4),          # EVA initialises A from activations of 4 batches
    "hra": {},
    "road": dict(lr=5e-3),               # measured: 62% at 2e-3, 66% at 5e-3 (loss 0.18 vs 0.11)
    "vera": dict(lr=3e-2),               # only the scaling vectors train; 50% at 1e-2, 72% at 3e-2
    "lora_xs": dict(lr=1e-2),            # only an r x r core trains
    "ia3": dict(lr=2e-2, targets=(r"(k_proj|v_proj)$",)),
    "ia3_ff": dict(lr=2e-2, targets=(r"down_proj$",)),
    # antipasto family: the config's r (128), alpha = r. Upstream ran 5000 steps at lr 5e-3; for
    # these 80 steps 1.5e-2 measured better: antipasto 58% -> 70%, rot 59% -> 71%, arrow 66% ->
    # 67% (loss 0.14 -> 0.09). The members not measured here keep upstream's 5e-3.
    "antipasto": dict(alpha="r", lr=1.5e-2),
    "antipasto_rot": dict(alpha="r", lr=1.5e-2),
    "antipasto_arrow": dict(alpha="r", lr=1.5e-2),
    "antipasto_dplr": dict(alpha="r", lr=5e-3),
    "antipasto_ablate": dict(alpha="r", lr=5e-3),
    "antipasto_corda": dict(alpha="r", lr=5e-3, calibration=16),
    "antipasto_asvd": dict(alpha="r", lr=5e-3, calibration=16),
}


def variant_defaults(variant: str) -> dict:
    """The defaults of ``variant``: the "*" row, the config's own rank / alpha / target_names,
    then the variant's row (an unknown antipasto_* gets antipasto's row)."""
    row = dict(VARIANT_DEFAULTS["*"])
    cls = ll.variants().get(variant)
    cfg_cls = getattr(cls, "config", None)
    row["rank"] = getattr(cfg_cls, "r", 8)
    row["alpha"] = float(getattr(cfg_cls, "alpha", 16.0))
    own_targets = getattr(cfg_cls, "target_names", ())
    if own_targets:
        row["targets"] = tuple(own_targets)
    own = VARIANT_DEFAULTS.get(variant)
    if own is None and variant.startswith("antipasto"):
        own = VARIANT_DEFAULTS["antipasto"]
    row.update(own or {})
    return row


class TrainError(Exception):
    """Stops a run with a one-line message (the CLI turns it into an error line + exit code)."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


@dataclass
class Settings:
    """Everything that defines a run (stored in metrics.json and in checkpoints)."""

    variant: str
    model: str = DEFAULT_MODEL
    train_data: str = data_mod.GENERATED
    eval_data: str = data_mod.GENERATED
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
    dtype: str = "float32"
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


# options that may differ from the checkpoint's when resuming (they do not change the training)
RESUME_FREE = {"output", "eval_limit", "eval_batch_size", "max_new_tokens", "device", "threads"}
SCHEDULES = ("cosine", "linear", "constant")


def resolve_settings(variant: str, given: dict) -> Settings:
    """Settings from the variant's defaults row, then every option the user gave (not None)."""
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
        s.output = os.path.join("lora-lite-runs", f"{short}__{variant}__s{s.steps}__seed{s.seed}")
    check_settings(s)
    return s


def check_settings(s: Settings) -> None:
    def need(ok, option, value, expected):
        if not ok:
            raise TrainError(f"{option} {value!r}: expected {expected}")
    need(s.steps >= 1, "--steps", s.steps, "at least 1")
    need(s.batch_size >= 1, "--batch-size", s.batch_size, "at least 1")
    need(s.grad_accum >= 1, "--grad-accum", s.grad_accum, "at least 1")
    need(s.lr > 0, "--lr", s.lr, "a positive learning rate")
    need(s.schedule in SCHEDULES, "--schedule", s.schedule, f"one of {', '.join(SCHEDULES)}")
    need(0 <= s.warmup < s.steps, "--warmup", s.warmup, "between 0 and steps - 1")
    need(s.seq_len >= 8, "--seq-len", s.seq_len, "at least 8")
    need(s.eval_limit >= 0, "--eval-limit", s.eval_limit, "0 (no evaluation) or more")
    need(s.max_new_tokens >= 1, "--max-new-tokens", s.max_new_tokens, "at least 1")


# -- the adapter config ------------------------------------------------------------------------

def build_config(s: Settings):
    """The variant's typed config from the settings; --set knobs are typed from the config's
    fields (app.build_config: an unknown knob or bad value is a ConfigError naming it)."""
    from .app import build_config as cli_build_config
    return cli_build_config(s.variant, targets=list(s.targets), rank=s.rank, alpha=float(s.alpha),
                            layers=s.layers, dtype=s.dtype, sets=dict(s.knobs), seed=s.seed)


# -- tokenising and batching ---------------------------------------------------------------------

@dataclass
class Encoded:
    input_ids: list
    labels: list


def encode(tokenizer, examples, seq_len) -> tuple[list[Encoded], int]:
    """prompt + ' ' + answer + EOS, labels -100 over the prompt; (encoded, skipped) where
    skipped counts examples whose prompt alone fills seq_len."""
    out, skipped = [], 0
    eos = tokenizer.eos_token_id
    for ex in examples:
        prompt = tokenizer(data_mod.prompt_of(ex.question), add_special_tokens=False)["input_ids"]
        answer = tokenizer(" " + ex.answer.strip(), add_special_tokens=False)["input_ids"]
        if eos is not None:
            answer = answer + [eos]
        if len(prompt) >= seq_len:
            skipped += 1
            continue
        ids = (prompt + answer)[:seq_len]
        labels = ([-100] * len(prompt) + answer)[:seq_len]
        out.append(Encoded(ids, labels))
    return out, skipped


def collate(items: list[Encoded], pad_id: int, device) -> dict:
    """Left-padded batch: input_ids, attention_mask, labels (-100 on padding), position_ids
    counted from each row's first real token (as generate() does). Left padding aligns every
    row's answer at the right edge, so the loss needs logits of the last positions only."""
    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, e in enumerate(items):
        n = len(e.input_ids)
        ids[i, width - n:] = torch.tensor(e.input_ids)
        labels[i, width - n:] = torch.tensor(e.labels)
        mask[i, width - n:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "position_ids": positions.to(device), "labels": labels.to(device)}


def model_inputs(batch: dict) -> dict:
    """The batch without labels (what the model takes for a plain forward)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def supervised_tokens(items: list[Encoded]) -> int:
    """Tokens that contribute to the loss (label positions after the causal shift)."""
    return sum(sum(1 for t in e.labels[1:] if t != -100) for e in items)


class Batches:
    """Micro-batch ``j`` of the run = encoded examples [j*B, (j+1)*B) (cycling); each process
    takes a strided share of it."""

    def __init__(self, encoded, batch_size, rank=0, world_size=1):
        if not encoded:
            raise TrainError("no training example fits in --seq-len; raise it")
        self.encoded, self.batch_size = encoded, batch_size
        self.rank, self.world_size = rank, world_size

    def global_items(self, j):
        n = len(self.encoded)
        return [self.encoded[(j * self.batch_size + i) % n] for i in range(self.batch_size)]

    def local_items(self, j):
        return self.global_items(j)[self.rank::self.world_size]


# -- schedule ------------------------------------------------------------------------------------

def lr_factor(step: int, steps: int, schedule: str, warmup: int) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(steps - warmup, 1)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# -- distributed ---------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, tensor):
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, obj):
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(device: str) -> Dist:
    """torch.distributed from torchrun's environment (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(device: str | None, d: Dist | None = None) -> str:
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and d is not None and d.world_size > 1:
        device = f"cuda:{d.local_rank}"
    return device


# -- threads -----------------------------------------------------------------------------------

def busy_cores(interval: float = 0.5) -> float | None:
    """How many cores other work keeps busy now: the busy share of all CPU time in /proc/stat
    over ``interval`` seconds, times the core count (Linux; None elsewhere)."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]
        return values[3] + values[4], sum(values)  # idle + iowait, total
    try:
        idle0, total0 = sample()
        time.sleep(interval)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1.0 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def auto_threads() -> int:
    """Torch threads for this run: one per core that other work does not keep busy (at least
    1). A busy core makes a 2-thread matmul wait for its descheduled thread: measured here with
    one of two cores busy, a 50 x 32-token generation took 43 s on 2 threads and 16 s on 1, a
    training step 6-18 s and 3.3-3.7 s. OMP_NUM_THREADS, when set, wins."""
    current = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        return current
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    busy = busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):
            return current
    return max(1, min(current, cores - int(round(busy))))


def set_threads(threads: int | None) -> int:
    torch.set_num_threads(threads or auto_threads())
    return torch.get_num_threads()


# -- memory --------------------------------------------------------------------------------------

def peak_memory_mb(device: str) -> dict:
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.startswith("cuda") and torch.cuda.is_available():
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


# -- the run -------------------------------------------------------------------------------------

CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE = "trainer.pt"


class Reporter:
    """What the loop tells the user; the CLI passes one that draws rich progress bars."""

    def status(self, text):
        pass

    def start_train(self, steps, done):
        pass

    def step(self, step, loss, lr, tokens_per_s):
        pass

    def end_train(self):
        pass

    def start_eval(self, label, n):
        pass

    def eval_advance(self, k):
        pass

    def end_eval(self):
        pass


class StopRequest:
    """Ctrl-C during training: the first SIGINT asks to stop at the next step boundary (so the
    checkpoint is consistent), a second one interrupts at once. Only in the main thread."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        import sys
        sys.stderr.write("\nCtrl-C: stopping after this step and saving a checkpoint "
                         "(Ctrl-C again to stop at once)\n")

    def __enter__(self):
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        import signal
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        return False

    def agreed(self, d: "Dist") -> bool:
        """True on every process once any process was asked to stop."""
        if d.world_size == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


@dataclass
class RunResult:
    status: str                 # completed | nonfinite | interrupted
    output: str
    metrics: dict
    message: str = ""


def _adapter_snapshot(model):
    return {k: v.detach().clone() for k, v in ll.adapter_tensors(model).items()}


def _restore_adapter(model, snapshot):
    with torch.no_grad():
        for k, v in ll.adapter_tensors(model).items():
            v.copy_(snapshot[k])


def _probe_loss(model, batch):
    with torch.no_grad():
        return _loss_sum(model, batch)[0].item() / max(_count(batch), 1)


def _count(batch):
    return int((batch["labels"][:, 1:] != -100).sum())


def _accepts(model, name) -> bool:
    import inspect
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _loss_sum(model, batch):
    """(summed token cross-entropy over supervised positions, the logits used). Only the
    logits from the first supervised position on are computed (``logits_to_keep``) where the
    model supports it: the prompt's share of the vocabulary projection is skipped."""
    labels = batch["labels"][:, 1:]
    supervised = (labels != -100).any(0).nonzero()
    first = int(supervised[0]) if len(supervised) else labels.shape[1] - 1
    keep = labels.shape[1] - first + 1      # logits of positions first .. L-1
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "use_cache": False}
    if "position_ids" in batch and _accepts(model, "position_ids"):
        kwargs["position_ids"] = batch["position_ids"]
    if _accepts(model, "logits_to_keep"):
        logits = model(**kwargs, logits_to_keep=keep).logits
    else:
        logits = model(**kwargs).logits[:, -keep:]
    logits = logits[:, :-1].float()            # position t predicts token t + 1
    target = labels[:, first:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             target.reshape(-1), ignore_index=-100,
                                             reduction="sum")
    return loss, logits


def save_checkpoint(folder, model, optimizer, scheduler, step, state: dict):
    os.makedirs(folder, exist_ok=True)
    ll.save(model, os.path.join(folder, "adapter.safetensors"))
    payload = {"step": step, "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
               "python_rng": random.getstate(), **state}
    tmp = os.path.join(folder, TRAINER_STATE + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, os.path.join(folder, TRAINER_STATE))


def read_checkpoint(path: str) -> tuple[str, dict]:
    """(checkpoint folder, trainer state) from a checkpoint folder, its trainer.pt or a run folder."""
    folder = path
    if os.path.isfile(path):
        folder = os.path.dirname(os.path.abspath(path))
    elif os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
        folder = os.path.join(path, CHECKPOINT_DIR)
    state_file = os.path.join(folder, TRAINER_STATE)
    if not os.path.isfile(state_file) or not os.path.isfile(os.path.join(folder, "adapter.safetensors")):
        raise TrainError(f"--resume {path!r}: not a checkpoint (expected {TRAINER_STATE} and "
                         "adapter.safetensors in it)")
    return folder, torch.load(state_file, map_location="cpu", weights_only=True)


def settings_for_resume(path: str, given: dict) -> tuple[Settings, str, dict]:
    folder, state = read_checkpoint(path)
    saved = dict(state["settings"])
    saved["targets"] = tuple(saved.get("targets") or ())
    if saved.get("layers") is not None:
        saved["layers"] = tuple(saved["layers"])
    s = Settings(**saved)
    s.threads = None  # chosen afresh for this machine's load unless given
    for key, value in given.items():
        if value is None or key == "knobs" and not value:
            continue
        current = getattr(s, key)
        if isinstance(current, tuple):
            value = tuple(value)
        if key in RESUME_FREE:
            setattr(s, key, value)
        elif value != current:
            raise TrainError(f"--resume: {key} is {current!r} in the checkpoint, got {value!r}; "
                             "a resumed run keeps its settings")
    check_settings(s)
    return s, folder, state


def run(s: Settings, reporter: Reporter | None = None, resume: tuple[str, dict] | None = None,
        dist: Dist | None = None) -> RunResult:
    """Train and evaluate as described by ``s``. Raises TrainError / lora-lite errors."""
    reporter = reporter or Reporter()
    d = dist or Dist()
    t_start = time.perf_counter()
    times = {}
    torch.manual_seed(s.seed)
    random.seed(s.seed)
    set_threads(s.threads)
    if d.world_size > 1 and s.batch_size < d.world_size:
        raise TrainError(f"--batch-size {s.batch_size} is smaller than the {d.world_size} processes")

    cfg = build_config(s)  # fails fast on a bad variant / knob, before loading anything
    variant = ll.get_variant(s.variant)
    origin = ll.plugins.variant_origin(s.variant)

    reporter.status(f"loading model {s.model} ...")
    t0 = time.perf_counter()
    model, tokenizer = load_model(s.model, s.dtype, s.quantize, s.device)
    times["load_model_s"] = time.perf_counter() - t0

    reporter.status("preparing data ...")
    n_train = s.steps * s.grad_accum * s.batch_size
    train_src = data_mod.train_data(s.train_data, n_train, s.seed)
    eval_src = data_mod.eval_data(s.eval_data, s.eval_limit) if s.eval_limit else None
    encoded, skipped = encode(tokenizer, train_src.examples, s.seq_len)
    batches = Batches(encoded, s.batch_size, d.rank, d.world_size)
    device = next(model.parameters()).device

    def micro(j):
        return collate(batches.local_items(j), tokenizer.pad_token_id, device)

    def step_tokens(step):
        return sum(supervised_tokens(batches.global_items(step * s.grad_accum + a))
                   for a in range(s.grad_accum))

    metrics = {
        "status": "running", "variant": s.variant,
        "plugin": {"distribution": origin.distribution, "version": origin.version},
        "settings": s.to_dict(), "world_size": d.world_size,
        "model": {"name": s.model, "dtype": s.dtype, "quantize": s.quantize, **describe(model)},
        "data": {"train": {**train_src.fingerprint(), "skipped_prompt_too_long": skipped,
                           "examples_used": n_train},
                 "eval": eval_src.fingerprint() if eval_src else None,
                 "prompt": data_mod.PROMPT},
        "versions": {"torch": torch.__version__, "lora_lite": ll.__version__},
        "torch_threads": torch.get_num_threads(),
    }

    def run_eval(label):
        if eval_src is None:
            return None
        reporter.start_eval(label, len(range(d.rank, len(eval_src.examples), d.world_size)))
        t = time.perf_counter()
        result = eval_mod.evaluate(model, tokenizer, eval_src.examples, s.eval_batch_size,
                                   s.max_new_tokens, reporter.eval_advance, d.rank, d.world_size)
        result["time_s"] = round(time.perf_counter() - t, 2)
        reporter.end_eval()
        return result

    # base model evaluation (kept in the checkpoint, not redone on resume)
    if resume is None:
        base_eval = run_eval("base model")
    else:
        base_eval = resume[1].get("base_eval")
    times["eval_base_s"] = base_eval["time_s"] if base_eval else 0.0

    # attach (or restore from the checkpoint)
    t0 = time.perf_counter()
    if resume is None:
        calib = None
        if s.calibration or getattr(variant, "needs_calibration", False):
            k = max(s.calibration, 1)
            calib = [model_inputs(collate(batches.global_items(j), tokenizer.pad_token_id, device))
                     for j in range(k)]
        ll.attach(model, cfg, calibration_data=calib)
    else:
        ll.load(model, os.path.join(resume[0], "adapter.safetensors"))
    times["attach_s"] = time.perf_counter() - t0
    params = ll.trainable_parameters(model)
    stray = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    if stray or not params:
        raise TrainError(f"only adapter tensors may be trainable: found {stray[:3] or 'none trainable'}")
    metrics["adapter"] = {"config": cfg.to_dict(), "targets": len(ll.attached(model).targets),
                          "trainable_params": sum(p.numel() for p in params),
                          "calibration_batches": s.calibration if resume is None else None}

    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, s.steps, s.schedule, s.warmup))
    probe = micro(0)

    if resume is None:
        start, losses, lrs = 0, [], []
        before = _adapter_snapshot(model)
        sanity = {"first_grad_norm": None, "base_grad_leaks": 0, "train_tokens": 0}
        probe_before = _probe_loss(model, probe)
    else:
        st = resume[1]
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["torch_rng"])
        random.setstate(st["python_rng"])
        start, losses, lrs = st["step"], list(st["losses"]), list(st["lrs"])
        before, sanity, probe_before = st["adapter_before"], dict(st["sanity"]), st["probe_before"]
        times["train_s_before_resume"] = st.get("train_s", 0.0)

    out_dir = s.output
    if d.main:
        os.makedirs(out_dir, exist_ok=True)
    adapter_path = os.path.join(out_dir, "adapter.safetensors")
    status, message = "completed", ""
    train_s = times.get("train_s_before_resume", 0.0)
    reporter.start_train(s.steps, start)
    model.train()
    step = start
    last_good, kept_step = _adapter_snapshot(model), step
    stop = StopRequest()
    try:
        with stop:
            while step < s.steps:
                t_step = time.perf_counter()
                n_tokens = step_tokens(step)
                optimizer.zero_grad(set_to_none=True)
                loss_sum = torch.zeros((), dtype=torch.float64)
                seen = 0
                for a in range(s.grad_accum):
                    batch = micro(step * s.grad_accum + a)
                    seen += int(batch["attention_mask"].sum())
                    loss, _ = _loss_sum(model, batch)
                    (loss / n_tokens).backward()
                    loss_sum += loss.detach().double().cpu()
                sanity["base_grad_leaks"] += sum(
                    1 for n, p in model.named_parameters() if p.grad is not None and "lora_" not in n)
                step_loss = float(d.all_sum(loss_sum.to(device)).item()) / n_tokens
                if not math.isfinite(step_loss):
                    # the adapter that produced this loss is bad: go back to the one before it
                    _restore_adapter(model, last_good)
                    status = "nonfinite"
                    message = (f"loss is {step_loss} at step {step + 1}: training stopped; kept the "
                               f"adapter of the last step with a finite loss (after {kept_step} "
                               f"steps); try a lower --lr than {s.lr:g}")
                    break
                last_good, kept_step = _adapter_snapshot(model), step
                _sync_grads(params, d)
                grad_norm = sum(p.grad.double().norm().item() for p in params if p.grad is not None)
                if not math.isfinite(grad_norm):
                    status = "nonfinite"
                    message = (f"gradient norm is {grad_norm} at step {step + 1}: training stopped; "
                               f"kept the adapter before this step (after {kept_step} steps)")
                    break
                if sanity["first_grad_norm"] is None:
                    sanity["first_grad_norm"] = grad_norm
                if s.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
                lrs.append(scheduler.get_last_lr()[0])
                optimizer.step()
                scheduler.step()
                losses.append(step_loss)
                sanity["train_tokens"] += n_tokens
                step += 1
                if not all(bool(torch.isfinite(p).all()) for p in params):
                    _restore_adapter(model, last_good)
                    status = "nonfinite"
                    message = (f"the update of step {step} made adapter values non-finite: training "
                               f"stopped; kept the adapter before it (after {kept_step} steps); "
                               f"try a lower --lr than {s.lr:g}")
                    break
                dt = time.perf_counter() - t_step
                train_s += dt
                seen_total = float(d.all_sum(torch.tensor(float(seen), device=device)).item())
                reporter.step(step, step_loss, lrs[-1], seen_total / max(dt, 1e-9))
                if stop.agreed(d):  # Ctrl-C: stop at this step boundary, on every process
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        reporter.end_train()
        optimizer.zero_grad(set_to_none=True)
        folder = os.path.join(out_dir, CHECKPOINT_DIR)
        if d.main:
            save_checkpoint(folder, model, optimizer, scheduler, step, {
                "settings": s.to_dict(), "losses": losses, "lrs": lrs, "sanity": sanity,
                "adapter_before": before, "probe_before": probe_before,
                "base_eval": base_eval, "train_s": train_s})
        metrics.update(status="interrupted", checkpoint=folder, step=step)
        metrics["train"] = {"losses": losses, "lrs": lrs, "steps_done": step}
        if d.main:
            _write_json(os.path.join(out_dir, "metrics.json"), metrics)
        return RunResult("interrupted", out_dir, metrics,
                         f"interrupted at step {step}/{s.steps}: checkpoint saved to {folder}; "
                         f"resume with: lora-lite train --resume {folder}")
    reporter.end_train()
    model.eval()
    times["train_s"] = train_s

    # sanity figures and the adapter file
    after = _adapter_snapshot(model)
    sanity["adapter_delta"] = float(sum((after[k].double() - before[k].double()).norm().item()
                                        for k in after))
    sanity["only_adapter_trainable"] = True
    probe_after = _probe_loss(model, probe)
    with torch.no_grad():
        trained_logits = model(**model_inputs(probe)).logits.float()
    if d.main:
        ll.save(model, adapter_path)
    if d.world_size > 1:
        torch.distributed.barrier()
    ll.detach(model)  # the model is the base again, bit for bit; reload the file onto it
    ll.load(model, adapter_path)
    with torch.no_grad():
        reloaded = model(**model_inputs(probe)).logits.float()
    sanity["reload_err"] = (reloaded - trained_logits).abs().max().item()
    sanity["ok"] = bool(status == "completed" and (sanity["first_grad_norm"] or 0) > 0
                        and sanity["adapter_delta"] > 0 and sanity["base_grad_leaks"] == 0)

    adapted_eval = run_eval("adapted model") if status == "completed" else None
    times["eval_adapted_s"] = adapted_eval["time_s"] if adapted_eval else 0.0
    times["total_s"] = time.perf_counter() - t_start + times.get("train_s_before_resume", 0.0)

    mem = peak_memory_mb(str(device))
    if d.world_size > 1:
        peaks = torch.tensor([mem["peak_rss_mb"]], dtype=torch.float64)
        torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
        mem["peak_rss_mb_max_rank"] = float(peaks.item())
    tokens_total = sanity["train_tokens"]
    metrics.update(status=status)
    if message:
        metrics["message"] = message
    metrics["train"] = {
        "steps_done": step, "losses": losses, "lrs": lrs,
        "adapter_kept_from_step": kept_step if status == "nonfinite" else step,
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "probe_loss_before": probe_before, "probe_loss_after": probe_after,
        "supervised_tokens": tokens_total,
        "supervised_tokens_per_s": tokens_total / train_s if train_s else None,
    }
    metrics["sanity"] = sanity
    metrics["eval"] = {
        "base": _summary(base_eval), "adapted": _summary(adapted_eval),
        "max_new_tokens": s.max_new_tokens,
    }
    metrics["accuracy_before"] = base_eval["accuracy"] if base_eval else None
    metrics["accuracy_after"] = adapted_eval["accuracy"] if adapted_eval else None
    metrics["time"] = {k: round(v, 2) for k, v in times.items()}
    metrics["memory"] = mem
    metrics["files"] = {"adapter": adapter_path}
    if d.main:
        if base_eval or adapted_eval:
            pred_path = os.path.join(out_dir, "predictions.jsonl")
            write_predictions(pred_path, base_eval, adapted_eval)
            metrics["files"]["predictions"] = pred_path
        try:
            from .plotting import loss_curve
            png = os.path.join(out_dir, "loss.png")
            loss_curve(losses, lrs, png, title=_plot_title(s, metrics))
            metrics["files"]["loss_curve"] = png
        except Exception as e:  # a plotting problem must not lose the run
            metrics["files"]["loss_curve_error"] = f"{type(e).__name__}: {e}"
        _write_json(os.path.join(out_dir, "metrics.json"), metrics)
        if resume is None and os.path.isdir(os.path.join(out_dir, CHECKPOINT_DIR)):
            pass  # an old checkpoint of another run in this folder is left alone
    return RunResult(status, out_dir, metrics, message)


def _sync_grads(params, d: Dist):
    """Sum the adapter gradients over processes (one all-reduce of a flat buffer)."""
    if d.world_size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    d.all_sum(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def _summary(result):
    if result is None:
        return None
    return {k: result[k] for k in ("accuracy", "correct", "n", "time_s")}


def _plot_title(s, metrics):
    before, after = metrics.get("accuracy_before"), metrics.get("accuracy_after")
    acc = ""
    if before is not None and after is not None:
        acc = f"  accuracy {before:.1%} -> {after:.1%}"
    return f"{s.variant} on {os.path.basename(s.model)}, lr {s.lr:g}, r {s.rank}{acc}"


def write_predictions(path, base_eval, adapted_eval):
    base = {p["index"]: p for p in (base_eval or {}).get("predictions", [])}
    adapted = {p["index"]: p for p in (adapted_eval or {}).get("predictions", [])}
    with open(path, "w", encoding="utf-8") as f:
        for i in sorted(set(base) | set(adapted)):
            row = base.get(i) or adapted.get(i)
            rec = {"index": i, "question": row["question"], "reference": row["reference"]}
            for label, src in (("base", base), ("adapted", adapted)):
                if i in src:
                    rec[label] = {"output": src[i]["output"], "prediction": src[i]["prediction"],
                                  "correct": src[i]["correct"]}
            f.write(json.dumps(rec) + "\n")


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)
