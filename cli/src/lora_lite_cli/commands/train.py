"""``lora-lite train``: fine-tune an adapter, evaluate before and after, write the run folder."""
from __future__ import annotations

from pathlib import Path

import typer

from ..app import app, console, err_console, handle_errors
from ..errors import CLIError
from ..options import json_option, variant_option
from ..output import print_json
from .settings_options import settings_options


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
@settings_options
def train_command(
    variant: str | None = variant_option(),
    resume: Path | None = typer.Option(
        None, "--resume",
        help="Continue from a checkpoint folder (written on Ctrl-C) with its settings.",
    ),
    as_json: bool = json_option("the metrics"),
    given: dict | None = None,
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
