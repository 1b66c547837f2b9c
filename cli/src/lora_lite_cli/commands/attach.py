"""``lora-lite attach``: attach a variant to a model, show what it touched, measure identity."""
from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from ..app import app, console, err_console, handle_errors
from ..configs import build_config, parse_layers, parse_sets
from ..models import DEFAULT_MODEL, load_base_model
from ..options import (
    check_quantize,
    default_targets_text,
    dtype_option,
    layers_option,
    quantize_option,
    rank_option,
    sets_option,
    variant_option,
)
from ..output import print_json

PROBE_BATCH, PROBE_SEQ = 2, 16          # the fixed input of the identity check
CALIB_BATCHES, CALIB_BATCH, CALIB_SEQ = 4, 2, 32


def calibration_batches(vocab_size: int, n=CALIB_BATCHES, batch=CALIB_BATCH, seq=CALIB_SEQ,
                        device="cpu") -> list[dict]:
    """Generated calibration data for variants that initialise from data (not real text)."""
    from lora_lite.testing.measure import token_batch
    return [token_batch(vocab_size, batch, seq, seed=1000 + i, device=device) for i in range(n)]


def vocab_size(model) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def target_rows(model) -> list[dict]:
    """One record per adapted layer: name, role, shape, adapter tensor counts."""
    import lora_lite as ll
    state = ll.attached(model)
    rows = []
    for t in state.targets:
        trainable = frozen = 0
        for name in state.tensor_names[t.name]:
            tensor = getattr(t.layer, name)
            if getattr(tensor, "requires_grad", False):
                trainable += tensor.numel()
            else:
                frozen += tensor.numel()
        rows.append({"name": t.name, "role": t.role, "d_in": t.d_in, "d_out": t.d_out,
                     "trainable": trainable, "buffers": frozen,
                     "tensors": list(state.tensor_names[t.name])})
    return rows


@app.command("attach")
@handle_errors
def attach_command(
    variant: str = variant_option(...),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m",
                              help="'smollm2' (embedded default), a local model folder, a .gguf file or a hub name."),
    targets: list[str] | None = typer.Option(
        None, "--targets", "-t",
        help=f"Regex on layer names, repeatable (default: the variant's own, else {default_targets_text()}).",
    ),
    rank: int | None = rank_option(),
    alpha: float | None = typer.Option(None, "--alpha", help="LoRA scale numerator: s = alpha / r."),
    layers: str | None = layers_option(),
    sets: list[str] | None = sets_option("--set lambda0=0.1"),
    dtype: str = dtype_option(),
    quantize: str | None = quantize_option(),
    seed: int = typer.Option(0, "--seed", help="Seed of the adapter's random init."),
    save: Path | None = typer.Option(
        None, "--save",
        help="Write the freshly attached adapter to this .safetensors file.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
):
    """Attach a variant to a model and show what it touched and its identity error.

    Lists the adapted layers (name, role, shape, adapter parameters), the total trainable parameters and the identity
    error at init: max |logit difference| between base and adapted model on a fixed random 2x16 input. --save writes the
    initial adapter.
    """
    import torch

    import lora_lite as ll
    from lora_lite.testing import measure, same_kernel_logits


    check_quantize(quantize)
    cfg = build_config(variant, targets=targets, rank=rank, alpha=alpha, layers=parse_layers(layers),
                       dtype=dtype, sets=parse_sets(sets), seed=seed)  # fails before loading
    cls = ll.get_variant(variant)
    with err_console.status(f"loading {model} ..."):
        base, _ = load_base_model(model, dtype=dtype, quantize=quantize)
    vocab = vocab_size(base)
    probe = measure.token_batch(vocab, PROBE_BATCH, PROBE_SEQ, seed=0)
    base_logits = same_kernel_logits(base, probe)
    calib = None
    if cls.needs_calibration:
        calib = calibration_batches(vocab)
        msg = (f"{variant} initialises from data: using {len(calib)} batches of "
               f"{CALIB_BATCH}x{CALIB_SEQ} generated random token ids as calibration data "
               "(not real text; train uses the training data)")
        if not as_json:
            console.print(msg, highlight=False)
    start = time.perf_counter()
    ll.attach(base, cfg, calibration_data=calib)
    init_s = time.perf_counter() - start
    with torch.no_grad():
        adapted = base(**probe).logits.float()
    err = (adapted - base_logits).abs().max().item()
    scale = base_logits.abs().max().item()
    rows = target_rows(base)
    trainable = sum(p.numel() for p in ll.trainable_parameters(base))
    total = sum(p.numel() for n, p in base.named_parameters() if ".lora_" not in n)
    if save is not None:
        ll.save(base, save)
    result = {
        "variant": variant, "model": model, "config": cfg.to_dict(),
        "targets": rows, "trainable_params": trainable, "base_params": total,
        "identity_error": err, "identity_error_relative": err / scale if scale else None,
        "probe": f"{PROBE_BATCH}x{PROBE_SEQ} random token ids, seed 0",
        "calibration": (f"{len(calib)} batches of {CALIB_BATCH}x{CALIB_SEQ} generated token ids"
                        if calib else None),
        "init_seconds": init_s, "saved": str(save) if save else None,
    }
    if as_json:
        print_json(result)
    else:
        show(result, scale)


def show(result: dict, scale: float):
    """The attach report as rich tables (``result`` is what --json prints)."""
    rows, trainable, total = result["targets"], result["trainable_params"], result["base_params"]
    table = Table(title=f"{result['variant']} on {result['model']}: {len(rows)} target layer(s)",
                  title_justify="left")
    table.add_column("layer", overflow="fold")
    table.add_column("role")
    table.add_column("shape (in->out)", no_wrap=True)
    table.add_column("trainable", justify="right")
    table.add_column("buffers", justify="right")
    for r in rows:
        table.add_row(r["name"], r["role"], f"{r['d_in']}->{r['d_out']}", f"{r['trainable']:,}",
                      f"{r['buffers']:,}")
    console.print(table)
    console.print(f"trainable parameters: [bold]{trainable:,}[/] "
                  f"({100 * trainable / max(total, 1):.4f}% of the base's {total:,})")
    console.print(f"identity error at init: max |logit(adapted) - logit(base)| = "
                  f"[bold]{result['identity_error']:.3g}[/] (largest |logit| {scale:.3g}; "
                  f"{result['probe']})")
    console.print(f"attach took {result['init_seconds']:.2f} s")
    if result["saved"] is not None:
        console.print(f"wrote the initial adapter to {result['saved']}")
