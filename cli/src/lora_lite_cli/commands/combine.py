"""``lora-lite combine A B ...``: several adapters of one base model combined into one new
low-rank adapter file (``ll.combine``: linear, cat, svd, ties, dare_linear, dare_ties,
magnitude_prune, as PEFT's add_weighted_adapter), with one base load."""
from __future__ import annotations

import math
from pathlib import Path

import typer

from ..adapters import check_adapter, model_of_adapter
from ..app import app, console, err_console, handle_errors
from ..errors import CLIError
from ..models import load_base_model
from ..output import print_json


def _weights(text, count):
    if text is None:
        return [1.0] * count
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise CLIError(f"--weights {text!r}: give comma-separated numbers, e.g. 1,0.5", 2) from None
    if len(weights) != count or not all(math.isfinite(w) for w in weights):
        raise CLIError(f"--weights {text!r}: give {count} finite numbers, one per adapter", 2)
    return weights


@app.command("combine")
@handle_errors
def combine_command(
    adapters: list[Path] = typer.Argument(..., help="Adapter files (.safetensors) or PEFT folders, of one base model."),
    output: Path = typer.Option(..., "--output", "-o", help="The combined adapter file to write (.safetensors)."),
    how: str = typer.Option("svd", "--how", help="linear, cat, svd, ties, dare_linear, dare_ties or magnitude_prune."),
    weights: str | None = typer.Option(
        None, "--weights", "-w",
        help="Comma-separated weights, one per adapter (default 1 each).",
    ),
    rank: int | None = typer.Option(
        None, "--rank", "-r",
        help="svd: the rank of the result (default: the largest rank).",
    ),
    density: float | None = typer.Option(None, "--density", help="ties / dare / magnitude_prune: the fraction kept."),
    seed: int = typer.Option(0, "--seed", help="dare: the seed of the random pruning."),
    model: str | None = typer.Option(
        None, "--model", "-m",
        help="Base model (default: the one recorded with the first adapter).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
):
    """Combine adapters into one new adapter file."""
    import lora_lite as ll

    if len(adapters) < 2:
        raise CLIError("give two or more adapters to combine", 2)
    ws = _weights(weights, len(adapters))
    for path in adapters:
        check_adapter(path)  # a bad adapter fails before a model is loaded
    name = model or model_of_adapter(adapters[0])
    out = err_console if as_json else console
    with out.status(f"loading {name} ..."):
        base, _ = load_base_model(name, "float32")
    names = [f"a{i}" for i in range(len(adapters))]
    for label, path in zip(names, adapters, strict=True):
        ll.load(base, path, name=label)
    report = ll.combine(base, names, ws, how=how, name="combined", rank=rank, density=density,
                        seed=seed)
    ll.save(base, output, name="combined")
    errors = [v["relative_error"] for v in report["layers"].values()]
    result = {**report, "adapters": [str(p) for p in adapters], "weights": ws, "model": name,
              "output": str(output), "max_relative_error": max(errors) if errors else None}
    if as_json:
        print_json(result)
        return
    err = f"; max relative SVD error {max(errors):.3g}" if errors else ""
    console.print(f"wrote {output}: {how} of {len(adapters)} adapters, a rank-{report['rank']} "
                  f"{report['variant']} adapter{err}", highlight=False)
