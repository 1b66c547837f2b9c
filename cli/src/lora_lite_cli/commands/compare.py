"""``lora-lite compare``: train several variants under the same settings; table, plots, report."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

from ..app import app, console, err_console, handle_errors
from ..errors import CLIError
from ..options import MultiValueCommand


class SweepUI:
    """A bar for the whole sweep and one for the running job's phase (train, eval)."""

    def __init__(self, out_console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        self.console = out_console
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                 TimeElapsedColumn(), console=out_console)
        self.sweep = self.phase = self.job = None

    def start_sweep(self, total, skipped):
        self.progress.start()
        self.sweep = self.progress.add_task("[bold]sweep", total=total, completed=skipped,
                                            info=f"{skipped} stored" if skipped else "")

    def start_job(self, job):
        self.job = job
        self.progress.update(self.sweep, info=f"{job.variant} seed {job.seed}")
        self.phase = self.progress.add_task(f"  {job.variant}", total=None, info="starting")

    def event(self, e):
        kind = e.get("event")
        if kind == "start":
            self.progress.update(self.phase, description=f"  {e['phase']}", total=e["total"],
                                 completed=e.get("done", 0), info="")
        elif kind == "step":
            self.progress.update(self.phase, completed=e["step"], info=f"loss {e['loss']:.4f}")
        elif kind == "advance":
            self.progress.advance(self.phase, e["k"])
        elif kind == "status":
            self.progress.update(self.phase, info=e["text"][:60])
            if "resuming" in e["text"]:  # said once, above the bars
                self.progress.console.print(f"{self.job.variant} seed {self.job.seed}: {e['text']}",
                                            highlight=False)

    def end_job(self, job, rc, message):
        self.progress.remove_task(self.phase)
        self.progress.advance(self.sweep)
        verdict = "[green]done[/]" if rc == 0 else f"[red]failed[/] ({message})"
        self.progress.console.print(f"{job.variant} seed {job.seed}: {verdict}", highlight=False)

    def end_sweep(self):
        self.progress.stop()


@app.command("compare", cls=MultiValueCommand,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@handle_errors
def compare_command(
    ctx: typer.Context,
    variants: list[str] | None = typer.Option(
        None, "--variants",
        help="Variants to compare, space- or comma-separated (default: every installed variant).",
    ),
    sets: list[str] | None = typer.Option(
        None, "--set",
        help="One variant's setting, VARIANT.name=value, repeatable: lr, rank, alpha, targets, layers, calibration, "
        "schedule, warmup, weight_decay, grad_clip, or a knob of its config (e.g. --set hra.lr=1e-3 --set hra.r=4).",
    ),
    seeds: int = typer.Option(
        1, "--seeds",
        help="Seeds per variant, from --seed on (default: 1): mean and spread per variant.",
    ),
    force: list[str] | None = typer.Option(
        None, "--force",
        help="Re-run this variant even if its result is stored (repeatable).",
    ),
    output: Path = typer.Option(
        Path("lora-lite-compare"), "--output", "-o",
        help="Output folder: results.json, results.md, PNG plots, report.html, runs/.",
    ),
    markdown: bool = typer.Option(
        False, "--markdown",
        help="Print the results table as Markdown on stdout (for a README).",
    ),
):
    """Train each variant on the same data, budget and seed, back to back, and compare them.

    Every other option is one of `lora-lite train`'s (--model, --steps, --train-data, ...; see
    `lora-lite train --help`) and applies to every variant; each variant keeps its own train defaults (lr, targets, ...)
    unless an option overrides them. A result already stored for the same settings is reused,
    so re-running a finished or interrupted compare only runs what is missing.
    """
    import lora_lite as ll

    from ..compare import plan, report, results, sweep
    from ..compare.options import given_from_args

    names = _variant_names(variants)
    if seeds < 1:
        raise CLIError(f"--seeds {seeds}: expected at least 1", 2)
    for name in list(names) + list(force or ()):
        ll.get_variant(name)  # an unknown variant: one line with close names
    unplanned = sorted(set(force or ()) - set(names))
    if unplanned:
        raise CLIError(f"--force {unplanned[0]}: not one of --variants ({', '.join(names)})", 2)
    given = with_sweep_threads(given_from_args(ctx.args))
    out_dir = str(output.resolve())
    jobs = _jobs(plan, names, given, plan.per_variant_sets(sets, names), seeds, out_dir)
    outcome = sweep.run_jobs(jobs, set(force or ()), SweepUI(err_console if markdown else console))
    command = "lora-lite " + " ".join(shlex.quote(a) for a in sys.argv[1:]) \
        if sys.argv and sys.argv[0].endswith("lora-lite") else _command_text(names, ctx, sets, seeds)
    data = results.build(command, jobs, outcome)
    files = report.write_all(out_dir, data)
    _print_end(data, files, markdown, results)
    if outcome.interrupted:
        raise CLIError(f"interrupted: the finished results are kept in {out_dir}; run the same "
                       "command again to continue", 130)
    if outcome.failed:
        name, message = next(iter(outcome.failed.items()))
        raise CLIError(f"{len(outcome.failed)} run(s) failed, first {name}: {message}", 1)


def with_sweep_threads(given: dict) -> dict:
    """``given`` with one torch thread count for every run of the sweep: --threads, else the
    count the machine's load gives now (each worker picking its own made runs at different loads
    train on different thread counts)."""
    if given.get("threads") is None:
        from ..training.runtime import auto_threads
        given = {**given, "threads": auto_threads()}
    return given


def _variant_names(variants) -> list[str]:
    import lora_lite as ll
    names = [n.strip() for v in variants or () for n in v.split(",") if n.strip()]
    names = list(dict.fromkeys(names)) or sorted(ll.variants())
    if not names:
        raise CLIError("no variant installed (see `lora-lite variants`)", 2)
    return names


def _jobs(plan, names, given, sets, seeds, out_dir):
    from ..training import TrainError
    try:
        return plan.make_jobs(names, given, sets, seeds, out_dir)
    except TrainError as e:
        raise CLIError(str(e), e.code) from None


def _command_text(names, ctx, sets, seeds) -> str:
    parts = ["lora-lite", "compare", "--variants", *names, *ctx.args]
    parts += [a for s in sets or () for a in ("--set", s)]
    parts += ["--seeds", str(seeds)] if seeds > 1 else []
    return " ".join(shlex.quote(p) for p in parts)


def _print_end(data, files, markdown, results):
    from rich.table import Table
    if markdown:
        typer.echo(results.markdown(data))
        return
    table = Table(title="lora-lite compare", title_justify="left")
    for h in results.table_header(data):
        table.add_column(h)
    for row in results.table_rows(data["variants"]):
        table.add_row(*row)
    console.print(table)
    sw = data["sweep"]
    console.print(f"ran {len(sw['ran'])}, reused {len(sw['skipped'])} stored result(s); "
                  f"wrote {', '.join(sorted(files))} in {Path(files['report.html']).parent}",
                  highlight=False, soft_wrap=True)
