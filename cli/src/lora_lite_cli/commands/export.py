"""``lora-lite export``: an adapter (lora-lite file or PEFT folder) as a merged model folder that
plain transformers loads, or as a PEFT adapter folder."""
from __future__ import annotations

import os
from pathlib import Path

import typer

from ..adapters import check_adapter, model_of_adapter
from ..app import app, console, err_console, handle_errors
from ..errors import CLIError
from ..export_folder import ExportFolderError, check_output, staged_folder
from ..models import load_base_model
from ..output import print_json

FORMATS = ("merged", "peft")


@app.command("export")
@handle_errors
def export_command(
    adapter: Path = typer.Option(
        ..., "--adapter", "-a",
        help="Adapter file (.safetensors written by lora-lite) or a PEFT adapter folder.",
    ),
    output: Path = typer.Option(
        ..., "--output", "-o",
        help="Folder to write (created; a non-empty one is refused unless --overwrite).",
    ),
    format: str = typer.Option(
        ..., "--format", "-f",
        help="merged: a save_pretrained folder (weights, config, tokenizer) with the adapter folded in; peft: "
        "adapter_config.json + adapter_model.safetensors.",
    ),
    model: str | None = typer.Option(
        None, "--model", "-m",
        help="Base model (default: the one recorded with the adapter, else the embedded smollm2).",
    ),
    as_lora_rank: int | None = typer.Option(
        None, "--as-lora-rank",
        help="peft only: export the weight delta as a plain LoRA of this rank (truncated SVD; exact at full rank). "
        "Needed for variants PEFT lacks.",
    ),
    dtype: str = typer.Option("float32", "--dtype", help="Model dtype: float32, bfloat16, float16."),
    overwrite: bool = typer.Option(
        False, "--overwrite",
        help="Replace a non-empty --output: its previous contents are moved aside to OUTPUT.previous-N (never "
        "deleted).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
):
    """Write the adapter as a merged model (``--format merged``) or a PEFT folder (``--format peft``)."""
    import lora_lite as ll

    if format not in FORMATS:
        raise CLIError(f"--format {format!r}: expected one of {', '.join(FORMATS)}", 2)
    if as_lora_rank is not None and (format != "peft" or as_lora_rank < 1):
        raise CLIError("--as-lora-rank takes a positive rank and applies to --format peft only", 2)
    try:
        check_output(output, overwrite)
    except ExportFolderError as e:
        raise CLIError(str(e), 2) from None
    info = check_adapter(adapter)  # a bad adapter fails before a model is loaded
    name = model or model_of_adapter(adapter)
    out = err_console if as_json else console
    with out.status(f"loading {name} ..."):
        base, tokenizer = load_base_model(name, dtype)
    with out.status(f"attaching {adapter} ..."):
        ll.load(base, adapter)
    variant, n_layers = ll.attached(base).cfg.variant, len(ll.attached(base).targets)
    with out.status(f"writing {format} export to {output} ..."), \
            staged_folder(output, overwrite) as stage:  # renamed into place once complete
        if format == "merged":
            report = ll.merge(base)
            base.save_pretrained(stage.path)
            tokenizer.save_pretrained(stage.path)
        else:
            report = dict(ll.export_peft(base, stage.path, as_lora_rank=as_lora_rank),
                          folder=os.fspath(output))
    if stage.aside:
        err_console.print(f"the previous contents of {output} were moved to {stage.aside}",
                          highlight=False, soft_wrap=True)
    result = {"adapter": str(adapter), "adapter_kind": info["kind"], "variant": variant,
              "model": name, "format": format, "output": os.fspath(output),
              "as_lora_rank": as_lora_rank, "layers": n_layers, "moved_aside": stage.aside,
              "max_error": report.get("max_write_error", report.get("max_relative_error")),
              "report": report}
    if as_json:
        print_json(result)
        return
    what = "merged model" if format == "merged" else f"PEFT {report['peft_type']} adapter"
    error_kind = "write error" if format == "merged" else "relative SVD error"
    console.print(f"wrote the {variant} adapter as a {what} to {output} ({n_layers} layers; "
                  f"max {error_kind} {result['max_error']:.3g})", highlight=False)
