"""``lora-lite train``: fine-tune an adapter, evaluate before and after, write the run folder."""
from __future__ import annotations

from pathlib import Path

import typer

from ..app import (
    CLIError,
    app,
    console,
    dtype_option,
    err_console,
    handle_errors,
    json_option,
    layers_option,
    model_option,
    parse_layers,
    parse_sets,
    print_json,
    quantize_option,
    rank_option,
    sets_option,
    targets_option,
    threads_option,
    variant_option,
)


class RichReporter:
    """Progress bars on rank 0: training (step, loss, lr, tokens/s, ETA) and evaluation."""

    def __init__(self, out_console, enabled=True):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        self.console, self.enabled = out_console, enabled
        self.columns = dict(
            train=[TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss [bold]{task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                   TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("ETA"),
                   TimeRemainingColumn()],
            eval=[TextColumn("[bold]eval {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()])
        self.Progress = Progress
        self.progress = self.task = None
        self.log_every = 1
        self.steps = 0

    def _open(self, kind):
        self.progress = self.Progress(*self.columns[kind], console=self.console, transient=False)
        self.progress.start()

    def _close(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def status(self, text):
        if self.enabled:
            self.console.print(f"[dim]{text}[/]", highlight=False)

    def start_train(self, steps, done):
        if not self.enabled:
            return
        self._open("train")
        self.steps = steps
        self.log_every = max(1, steps // 10)
        self.task = self.progress.add_task("train", total=steps, completed=done, loss="-", lr="-",
                                           tps="-")

    def step(self, step, loss, lr, tokens_per_s):
        if not self.enabled:
            return
        self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                             tps=f"{tokens_per_s:,.0f}")
        if not self.console.is_terminal and (step % self.log_every == 0 or step == self.steps):
            self.console.print(f"step {step}/{self.steps}  loss {loss:.4f}  lr {lr:.2e}  "
                               f"{tokens_per_s:,.0f} tok/s", highlight=False)

    def end_train(self):
        self._close()

    def start_eval(self, label, n):
        if self.enabled:
            self._open("eval")
            self.task = self.progress.add_task(label, total=n)

    def eval_advance(self, k):
        if self.enabled and self.progress is not None:
            self.progress.advance(self.task, k)

    def end_eval(self):
        self._close()


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def print_summary(result, out):
    from rich.table import Table
    m = result.metrics
    ev = m.get("eval", {})
    table = Table(title=f"{m['variant']} on {m['settings']['model']}", title_justify="left",
                  show_header=False)
    table.add_column(style="bold")
    table.add_column()
    base, adapted = ev.get("base"), ev.get("adapted")
    if ev.get("metric") == "loss":
        for label, res in (("held-out loss, base", base), ("held-out loss, adapted", adapted)):
            if res:
                table.add_row(label, f"{res['loss']:.4f}  (perplexity {res['perplexity']:.3g}, "
                                     f"{res['tokens']} tokens)")
        base = adapted = None
    if base:
        table.add_row("accuracy, base", f"{_pct(base['accuracy'])}  ({base['correct']}/{base['n']})")
    if adapted:
        table.add_row("accuracy, adapted", f"{_pct(adapted['accuracy'])}  ({adapted['correct']}/{adapted['n']})")
    tr = m.get("train", {})
    if tr.get("loss_first") is not None:
        table.add_row("loss", f"{tr['loss_first']:.4f} -> {tr['loss_last']:.4f} "
                              f"({tr['steps_done']} steps)")
    table.add_row("trainable parameters", f"{m['adapter']['trainable_params']:,}")
    t = m.get("time", {})
    table.add_row("time", f"train {t.get('train_s', 0):.1f} s, eval {t.get('eval_base_s', 0):.1f}"
                          f" + {t.get('eval_adapted_s', 0):.1f} s, total {t.get('total_s', 0):.1f} s")
    mem = m.get("memory", {})
    table.add_row("peak memory", f"{mem.get('peak_rss_mb', 0):,.0f} MB process"
                  + (f", {mem['peak_cuda_mb']:,.0f} MB CUDA" if "peak_cuda_mb" in mem else ""))
    s = m.get("sanity", {})
    verdict = "[green]OK[/]" if s.get("ok") else "[red]FAILED[/]"
    table.add_row("sanity", f"{verdict}: first grad norm {s.get('first_grad_norm') or 0:.3g} (>0), "
                            f"adapter delta {s.get('adapter_delta', 0):.3g} (>0), "
                            f"base-grad leaks {s.get('base_grad_leaks')} (=0), "
                            f"reload err {s.get('reload_err', 0):.2g}")
    table.add_row("output", f"{result.output}/ (adapter.safetensors, metrics.json, loss.png)")
    out.print(table)


@app.command("train")
@handle_errors
def train_command(
    variant: str | None = variant_option(),
    model: str | None = model_option(),
    train_data: str | None = typer.Option(
        None, "--train-data",
        help="'generated' (default: built-in arithmetic problems), a .jsonl file, a dataset folder or a hub dataset "
        "NAME, NAME:CONFIG or NAME:CONFIG@SPLIT, e.g. meta-math/MetaMathQA.",
    ),
    eval_data: str | None = typer.Option(
        None, "--eval-data",
        help="'generated' (the fixed held-out split), a .jsonl file, a dataset folder or a hub dataset, e.g. "
        "openai/gsm8k.",
    ),
    data_format: str | None = typer.Option(
        None, "--data-format",
        help="Format of the data files: qa, chat, alpaca, prompt_completion or text (default: detected from the "
        "fields).",
    ),
    loss_on: str | None = typer.Option(
        None, "--loss-on",
        help="completion: train on the completion / assistant turns only; all: on the prompt too (default: "
        "completion).",
    ),
    metric: str | None = typer.Option(
        None, "--metric",
        help="Evaluation: numeric (the answer's number), exact (the completion) or loss (held-out loss, perplexity) "
        "(default: numeric for question/answer data, else loss).",
    ),
    pack: bool = typer.Option(
        False, "--pack",
        help="Pack training examples into rows of --seq-len tokens (labels masked per example).",
    ),
    steps: int | None = typer.Option(None, "--steps", help="Optimizer steps (default: 80)."),
    batch_size: int | None = typer.Option(
        None, "--batch-size", "-b",
        help="Examples per micro-batch, over all processes (default: 8).",
    ),
    grad_accum: int | None = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step (default: 1)."),
    lr: float | None = typer.Option(
        None, "--lr",
        help="Peak learning rate (default: the variant's own, see `lora-lite variants --json`).",
    ),
    schedule: str | None = typer.Option(
        None, "--schedule",
        help="LR schedule: cosine, linear or constant (default: cosine).",
    ),
    warmup: int | None = typer.Option(None, "--warmup", help="Linear warm-up steps (default: 0)."),
    weight_decay: float | None = typer.Option(None, "--weight-decay", help="AdamW weight decay (default: 0)."),
    grad_clip: float | None = typer.Option(
        None, "--grad-clip",
        help="Clip the adapter gradient norm, 0 for no clipping (default: 1.0).",
    ),
    seq_len: int | None = typer.Option(
        None, "--seq-len",
        help="Truncate training examples to this many tokens (default: 256).",
    ),
    targets: list[str] | None = targets_option(),
    layers: str | None = layers_option(),
    rank: int | None = rank_option(),
    alpha: float | None = typer.Option(
        None, "--alpha",
        help="Scale numerator, s = alpha / r (default: per variant, 16).",
    ),
    sets: list[str] | None = sets_option(),
    dtype: str | None = dtype_option(None),
    mixed_precision: str | None = typer.Option(
        None, "--mixed-precision",
        help="Autocast the forward: no, bf16 or fp16 (fp16: CUDA only, with a loss scaler); the adapter's master "
        "weights stay float32 (default: no).",
    ),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the adapted model for training."),
    gradient_checkpointing: bool = typer.Option(
        False, "--gradient-checkpointing",
        help="Recompute each block's activations in the backward pass (less activation memory, more compute; the same "
        "loss and gradients).",
    ),
    quantize: str | None = quantize_option(),
    seed: int | None = typer.Option(
        None, "--seed",
        help="Seed of data order/generation and adapter init (default: 0).",
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o",
        help="Run folder (default: lora-lite-runs/<model>__<variant>__s<steps>__seed<seed>).",
    ),
    resume: Path | None = typer.Option(
        None, "--resume",
        help="Continue from a checkpoint folder (written on Ctrl-C) with its settings.",
    ),
    eval_limit: int | None = typer.Option(
        None, "--eval-limit",
        help="Evaluate on the first N held-out items, 0 to skip evaluation (default: 100).",
    ),
    eval_batch_size: int | None = typer.Option(
        None, "--eval-batch-size",
        help="Prompts per generation batch (default: 50).",
    ),
    max_new_tokens: int | None = typer.Option(
        None, "--max-new-tokens",
        help="Generation budget per answer (default: 32).",
    ),
    calibration: int | None = typer.Option(
        None, "--calibration-batches",
        help="Training micro-batches given to data-initialised variants at attach (default: per variant).",
    ),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda or auto (default: cpu)."),
    threads: int | None = threads_option(),
    as_json: bool = json_option("the metrics"),
):
    """Fine-tune an adapter and measure it: base and adapted accuracy on held-out problems.

    With no option but --variant it runs offline: the embedded SmolLM2-135M-Instruct and the
    built-in arithmetic word problems. Writes adapter.safetensors, metrics.json, predictions.jsonl
    and loss.png to the run folder. Ctrl-C or SIGTERM saves a checkpoint (continue with --resume); a NaN/inf
    loss stops the run (exit code 3) and keeps the last good adapter. Under
    `torchrun --nproc_per_node N` or `accelerate launch --num_processes N` the same command
    trains with DDP through accelerate (gloo on CPU, nccl on CUDA).
    """
    from .. import training
    from ..data import DataError
    from ..models import resolve
    from ..training import runtime

    given = dict(model=model, train_data=train_data, eval_data=eval_data, steps=steps,
                 data_format=data_format, loss_on=loss_on, metric=metric, pack=pack or None,
                 batch_size=batch_size, grad_accum=grad_accum, lr=lr, schedule=schedule,
                 warmup=warmup, weight_decay=weight_decay, grad_clip=grad_clip, seq_len=seq_len,
                 targets=tuple(targets) if targets else None,
                 layers=parse_layers(layers) if layers is not None else None,
                 rank=rank, alpha=alpha, knobs=parse_sets(sets) if sets else None, dtype=dtype,
                 mixed_precision=mixed_precision, compile=compile_model or None,
                 gradient_checkpointing=gradient_checkpointing or None,
                 quantize=quantize, seed=seed, output=str(output) if output else None,
                 eval_limit=eval_limit, eval_batch_size=eval_batch_size,
                 max_new_tokens=max_new_tokens, calibration=calibration, device=device,
                 threads=threads)
    accelerator = None
    try:
        settings, resume_state = _settings(training, variant, resume, given)
        training.build_config(settings)  # a bad knob or value fails before anything loads
        resolve(settings.model)           # so does a missing model
        settings.device = runtime.pick_device(settings.device)
        settings.threads = runtime.set_threads(settings.threads)  # recorded: what the run used
        accelerator = runtime.make_accelerator(settings)
        main = accelerator.is_main_process
        if main and not as_json:
            _print_header(settings, accelerator.num_processes)
        reporter = RichReporter(err_console if as_json else console, enabled=main)
        result = training.run(settings, reporter, resume_state, accelerator)
    except training.TrainError as e:
        raise CLIError(str(e), e.code) from None
    except DataError as e:
        raise CLIError(str(e), 2) from None
    finally:
        runtime.finish(accelerator)
    if not main:
        return
    if result.status == "interrupted":
        raise CLIError(result.message, 130)
    if as_json:
        print_json(result.metrics)
    else:
        print_summary(result, console)
    if result.status == "nonfinite":
        raise CLIError(result.message + f"; adapter: {result.output}/adapter.safetensors", 3)


def _settings(training, variant, resume, given):
    """(settings, resume state or None) from the options, or from the checkpoint."""
    if resume is not None:
        settings, folder, state = training.settings_for_resume(str(resume), given)
        if variant and variant != settings.variant:
            raise CLIError(f"--resume: the checkpoint trains {settings.variant!r}, not {variant!r}", 2)
        return settings, (folder, state)
    if not variant:
        raise CLIError("missing option --variant (see `lora-lite variants`)", 2)
    import lora_lite as ll
    ll.get_variant(variant)  # unknown variant: one line with close names
    return training.resolve_settings(variant, given), None


def _print_header(s, processes):
    accum = f" x {s.grad_accum}" if s.grad_accum > 1 else ""
    extra = "".join([f", {processes} processes" if processes > 1 else "",
                     f", mixed precision {s.mixed_precision}" if s.mixed_precision != "no" else "",
                     ", compiled" if s.compile else "",
                     ", gradient checkpointing" if s.gradient_checkpointing else ""])
    console.print(f"[bold]lora-lite train[/] {s.variant}: model {s.model}, data {s.train_data}, "
                  f"{s.steps} steps x batch {s.batch_size}{accum}, lr {s.lr:g} ({s.schedule}), "
                  f"r {s.rank}, targets {' '.join(s.targets)}, {s.threads} thread(s){extra}",
                  highlight=False, soft_wrap=True)
