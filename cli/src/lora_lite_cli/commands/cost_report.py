"""``lora-lite cost-report``: what each variant costs, optionally side by side with PEFT."""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ..app import app, console, err_console, handle_errors, warn
from ..configs import build_config, parse_layers, parse_sets
from ..errors import CLIError, one_line
from ..models import DEFAULT_MODEL, load_base_model
from ..options import (
    MultiValueCommand,
    check_quantize,
    default_targets_text,
    dtype_option,
    layers_option,
    quantize_option,
    rank_option,
)
from ..output import jsonable, print_json


def _si(value, digits=3) -> str:
    if value is None:
        return "-"
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g}{suffix}"
    return f"{value:.{digits}g}"


def _num(value, fmt="{:.3g}") -> str:
    return "-" if value is None else fmt.format(value)


def _ratio_text(row) -> str:
    if row.flops_per_token is None or row.macs_per_token is None:
        return "-"
    if row.flop_ratio is None:
        return "0=0" if row.flops_per_token == 0 else "-"
    return "inf" if row.flop_ratio == float("inf") else f"{row.flop_ratio:.3f}"


COLUMNS = ("variant", "impl", "trainable", "+MACs/tok (analytic)", "MACs rule",
           "+FLOPs/tok (measured)", "FLOPs/(2*MACs)", "fwd ms", "step ms (min-max)", "peak MB",
           "adapter MB", "AdamW MB", "activations MB", "init ms", "note")
RATIO_COLUMNS = ("variant", "trainable", "+FLOPs/tok", "fwd ms", "step ms (min-max)",
                 "adapter+AdamW+activations MB", "init ms")


def _step_text(row) -> str:
    if row.step_ms is None:
        return "-"
    lo_hi = f" ({row.step_ms_spread[0]:.1f}-{row.step_ms_spread[1]:.1f})" if row.step_ms_spread else ""
    return f"{row.step_ms:.1f}{lo_hi}"


def _cells(row) -> list[str]:
    if row.error:
        return [row.variant, row.impl] + ["-"] * (len(COLUMNS) - 3) + [f"failed: {one_line(row.error)}"]
    mb = "{:.2f}"
    return [row.variant, row.impl, f"{row.trainable:,}" if row.trainable is not None else "-",
            _si(row.macs_per_token), row.macs_rule or "-", _si(row.flops_per_token),
            _ratio_text(row), _num(row.fwd_ms, "{:.1f}"), _step_text(row),
            _num(row.peak_mb, "{:.1f}"), _num(row.adapter_mb, mb), _num(row.optimizer_mb, mb),
            _num(row.activations_mb, "{:.1f}"), _num(row.init_ms, "{:.1f}"), row.note]


def _range_text(r, key) -> str:
    lo, hi = r.get(f"{key}_range") or (None, None)
    spread = f" ({lo:.2f}-{hi:.2f})" if lo is not None and hi is not None else ""
    return _num(r[key], "{:.2f}") + spread


def _ratio_cells(r) -> list[str]:
    return [r["variant"], _num(r["trainable"], "{:.2f}"), _num(r["flops_per_token"], "{:.2f}"),
            _range_text(r, "fwd_ms"), _range_text(r, "step_ms"), _num(r["memory_mb"], "{:.2f}"),
            _num(r["init_ms"], "{:.2f}")]


def _header(report) -> list[str]:
    s = report.settings
    base = f"{s.quantize} bitsandbytes base" if s.quantize else "full-precision base"
    return [f"model {s.model} ({base}); batch {s.batch} x seq {s.seq_len} = "
            f"{s.batch * s.seq_len} tokens per call; device {s.device}; median of {s.repeats} "
            f"interleaved runs after {s.warmup} warm-up (ratios: median of the per-turn ratios, "
            "min-max in brackets)",
            f"memory: {report.memory_method}",
            report_conventions()]


def report_conventions():
    from ..cost import CONVENTIONS
    return CONVENTIONS


def markdown(report) -> str:
    def table(cols, rows):
        out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        return "\n".join(out)
    parts = ["\n".join(f"> {line}" for line in _header(report)), "",
             table(COLUMNS, [_cells(r) for r in report.rows])]
    if report.ratios:
        parts += ["", "lora-lite / PEFT (below 1: lora-lite is smaller, cheaper or faster):", "",
                  table(RATIO_COLUMNS, [_ratio_cells(r) for r in report.ratios])]
    return "\n".join(parts)


def show(report):
    """Rich tables for a terminal: the notes go below the table as numbered footnotes."""
    for line in _header(report):
        console.print(line, style="dim", highlight=False, soft_wrap=True)
    table = Table(title="cost per variant", title_justify="left")
    short = ("variant", "impl", "trainable", "+MACs/tok", "rule", "+FLOPs/tok", "ratio", "fwd ms",
             "step ms", "peak MB", "adapter", "AdamW", "activ.", "init ms", "n.")
    for col in short:
        table.add_column(col, no_wrap=True,
                         justify="left" if col in ("variant", "impl") else "right")
    notes: list[str] = []
    for r in report.rows:
        cells = _cells(r)
        note = cells.pop()
        ref = ""
        if note:
            if note not in notes:
                notes.append(note)
            ref = f"[{notes.index(note) + 1}]"
        table.add_row(*cells, ref)
    console.print(table, width=max(console.width, 160))  # never squeeze figures into ellipses
    console.print("+MACs/tok: analytic; +FLOPs/tok: measured; ratio = FLOPs / (2 x MACs)",
                  style="dim", highlight=False)
    for i, note in enumerate(notes, 1):
        console.print(f"[{i}] {note}", highlight=False, markup=False)
    if report.ratios:
        ratios = Table(title="lora-lite / PEFT (below 1: lora-lite is smaller, cheaper or faster)",
                       title_justify="left")
        for col in RATIO_COLUMNS:
            ratios.add_column(col, justify="left" if col == "variant" else "right")
        for r in report.ratios:
            ratios.add_row(*_ratio_cells(r))
        console.print(ratios, width=max(console.width, 120))


def _split(values) -> list[str]:
    out = []
    for v in values or ():
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


@app.command("cost-report", cls=MultiValueCommand)
@handle_errors
def cost_report_command(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m",
                              help="'smollm2' (embedded default), a local model folder, a .gguf file or a hub name."),
    variants: list[str] | None = typer.Option(
        None, "--variants",
        help="Variants to measure: --variants lora hra, --variants lora,hra or the option repeated "
        "(default: every installed one).",
    ),
    targets: list[str] | None = typer.Option(
        None, "--targets", "-t",
        help=f"Regex on layer names, repeatable (default: each variant's own, else {default_targets_text()}).",
    ),
    rank: int | None = rank_option(),
    layers: str | None = layers_option(),
    sets: list[str] | None = typer.Option(
        None, "--set", help="variant.knob=value (one variant) or knob=value (every variant that has it); repeatable."),
    seq_len: int = typer.Option(128, "--seq-len", help="Tokens per sequence of the random input."),
    batch: int = typer.Option(2, "--batch", help="Sequences per batch."),
    repeats: int = typer.Option(5, "--repeats", help="Timed runs per measurement (the median is shown)."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed runs before timing."),
    dtype: str = dtype_option(),
    quantize: str | None = quantize_option(),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu or cuda."),
    compare: str | None = typer.Option(
        None, "--compare",
        help="'peft': add PEFT's row for every variant PEFT also has, measured interleaved in the same run.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    as_markdown: bool = typer.Option(False, "--markdown", help="Print Markdown tables."),
    out: Path | None = typer.Option(None, "--out", help="Also write the report as JSON to this file."),
):
    """Measure what each variant costs on one model, optionally next to PEFT.

    Trainable parameters, added MACs per token (analytic, checked against torch's FlopCounterMode: FLOPs = 2 x MACs),
    forward and training-step time (medians), peak memory and init time. A base row (full fine-tuning) comes first.
    """
    from .. import cost

    device = _check_options(compare, quantize, seq_len, batch, repeats, warmup, device)
    names, configs = _configs(variants, targets, rank, layers, sets, dtype)
    with err_console.status(f"loading {model} ..."):
        base, _ = load_base_model(model, dtype=dtype, quantize=quantize, device=device)
    settings = cost.Settings(model=model, batch=batch, seq_len=seq_len, repeats=repeats,
                             warmup=warmup, device=device, compare_peft=compare == "peft",
                             quantize=quantize)
    report = _measure(cost, base, settings, names, configs)
    if out is not None:
        out.write_text(json.dumps(jsonable(report.to_dict()), indent=2))
    if as_json:
        print_json(report.to_dict())
    elif as_markdown:
        typer.echo(markdown(report))
    else:
        show(report)


def _need_module(module, why):
    import importlib
    try:
        importlib.import_module(module)
    except ImportError:
        raise CLIError(why, 2) from None


def _check_options(compare, quantize, seq_len, batch, repeats, warmup, device) -> str:
    """Every option checked before anything loads; returns the device to use."""
    import torch
    if compare not in (None, "peft"):
        raise CLIError(f"--compare {compare!r}: the only comparison is 'peft'", 2)
    if compare == "peft":
        _need_module("peft", "--compare peft needs PEFT: pip install 'lora-lite-cli[peft]'")
    check_quantize(quantize)
    if quantize:
        _need_module("bitsandbytes",
                     "--quantize needs bitsandbytes: pip install 'lora-lite-cli[quantize]'")
    for name, value in (("--seq-len", seq_len), ("--batch", batch), ("--repeats", repeats)):
        if value < 1:
            raise CLIError(f"{name} must be at least 1, got {value}", 2)
    if warmup < 0:
        raise CLIError(f"--warmup must be at least 0, got {warmup}", 2)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise CLIError(f"--device {device!r}: expected auto, cpu or cuda", 2)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available", 2)
    return device


def _configs(variants, targets, rank, layers, sets, dtype):
    """(names, {name: config}); every config is checked before the model is loaded."""
    import lora_lite as ll
    names = _split(variants) or sorted(ll.variants())
    if not names:
        raise CLIError("no adapter variant is installed: lora-lite install 'lora-lite[all]' "
                       "(every built-in variant)", 2)
    knob_sets = parse_sets(sets)
    layer_ids = parse_layers(layers)
    configs = {}
    for name in names:
        own = {k.split(".", 1)[1]: v for k, v in knob_sets.items() if k.startswith(name + ".")}
        fields = set(ll.get_variant(name).config.__dataclass_fields__)
        shared = {k: v for k, v in knob_sets.items() if "." not in k and k in fields}
        configs[name] = build_config(name, targets=targets, rank=rank, layers=layer_ids,
                                     dtype=dtype, sets={**shared, **own})
    unused = [k for k in knob_sets if "." not in k and
              not any(k in ll.get_variant(n).config.__dataclass_fields__ for n in names)]
    if unused:
        raise CLIError(f"--set {unused[0]}: no selected variant has a knob {unused[0]!r}", 2)
    return names, configs


def _measure(cost, base, settings, names, configs):
    with err_console.status("measuring ...") as status:
        def progress(message):  # a spinner on a terminal, one line per step in a log
            if err_console.is_terminal:
                status.update(f"measuring: {message}")
            else:
                err_console.print(f"measuring: {message}", style="dim", highlight=False,
                                  soft_wrap=True)
        runner = cost.CostReport(base, settings, progress=progress)
        runner.base_row()
        for name in names:
            try:
                runner.variant_rows(name, configs[name])
            except Exception as e:
                runner.failed_row(name, "lora-lite", f"{type(e).__name__}: {e}")
                warn(f"{name}: {type(e).__name__}: {e}")
    return runner.report
