"""``lora-lite check VARIANT...``: run lora-lite's conformance kit (``lora_lite.testing.
check_variant``) on the test model (a random tiny Llama, no download) and print its figures:
identity at init, reload error, PEFT parity, merge error, trainable count, per base."""
from __future__ import annotations

import logging
import warnings

import typer
from rich.table import Table

from ..app import app, console, handle_errors
from ..configs import build_config, parse_sets
from ..errors import CLIError
from ..options import check_quantize, default_targets_text
from ..output import print_json

CHECK_RANK = 4  # the kit's rank on the test model


def _bases(quantize: list[str]) -> list[str]:
    bases = ["fp32"]
    for item in quantize or []:
        for kind in (k.strip() for k in item.split(",") if k.strip()):
            if check_quantize(kind) not in bases:
                bases.append(kind)
    return bases


def run_check(name: str, bases, *, rank=None, sets=None, identity_tol=1e-5) -> dict:
    """check_variant's figures for one installed variant (raises CLIError on a failed check)."""
    import lora_lite as ll
    from lora_lite.testing import VariantCheckFailed, check_variant, make_batch
    warnings.simplefilter("ignore")  # library notices (bitsandbytes casts, PEFT on CPU): not figures
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    cls = ll.get_variant(name)
    uses_rank = cls.config.uses_rank
    cfg = build_config(name, rank=(rank or CHECK_RANK) if uses_rank else None, sets=sets)
    calibration = [make_batch(seed=s) for s in range(2)] \
        if cls.needs_calibration else None
    try:
        return check_variant(name, cfg, bases=bases, calibration_data=calibration,
                             identity_tol=identity_tol)
    except VariantCheckFailed as e:
        raise CLIError(f"{name}: check failed: {e}", 1) from None


def _num(value) -> str:
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value:.1e}"


def figures_row(fig: dict) -> dict:
    """The table's cells of one variant's figures (also the README's variants table)."""
    bases = fig["bases"]
    return {"variant": fig["variant"], "trainable": fig["trainable"],
            "identity": {b: f.get("identity_err") for b, f in bases.items()},
            "reload": {b: f.get("reload_err") for b, f in bases.items()},
            "detach_bitexact": all(f.get("detach_bitexact", True) for f in bases.values()),
            "peft_parity": fig["peft_parity"], "merge_err": fig["merge_err"],
            "mixed": _mixed(bases)}


def _mixed(bases) -> str:
    """The named-adapter check in one cell: the worst mixed-batch error, or why none ran."""
    multi = [f["multi"] for f in bases.values() if isinstance(f.get("multi"), dict)]
    if any("multi" in m for m in multi):
        return "refused"  # a base-rewriting variant: alone on its model
    errs = [m["mix_err"] for m in multi if m.get("mix_err") is not None]
    return _num(max(errs)) if errs else "-"


def _markdown(rows, bases):
    head = ["variant", "plugin"] + [f"identity {b}" for b in bases] + \
        ["reload (max)", "PEFT parity", "merge", "test-model params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    import lora_lite.plugins as plugins
    for r in rows:
        reload = max((v for v in r["reload"].values() if v is not None), default=None)
        cells = [r["variant"], plugins.variant_origin(r["variant"]).distribution] + \
            [_num(r["identity"].get(b)) for b in bases] + \
            [_num(reload), _num(r["peft_parity"]), _num(r["merge_err"]), f"{r['trainable']:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _table(rows, bases):
    table = Table(title=f"lora-lite check (tiny random Llama, r=4 on {default_targets_text()} unless set; "
                  "max |logit difference|)", title_justify="left")
    for col in ["variant", *[f"identity {b}" for b in bases], *[f"reload {b}" for b in bases],
                "PEFT parity", "merge", "mixed batch", "trainable", "detach"]:
        table.add_column(col, no_wrap=True)
    for r in rows:
        table.add_row(r["variant"], *[_num(r["identity"].get(b)) for b in bases],
                      *[_num(r["reload"].get(b)) for b in bases], _num(r["peft_parity"]),
                      _num(r["merge_err"]), r["mixed"], f"{r['trainable']:,}",
                      "bit-exact" if r["detach_bitexact"] else "[red]differs[/]")
    return table


@app.command("check")
@handle_errors
def check_command(
    variants: list[str] = typer.Argument(..., help="Installed variant names, or 'all'."),
    quantize: list[str] | None = typer.Option(
        None, "--quantize", help="Also check on a bitsandbytes base: 4bit, 8bit (repeat or a,b)."),
    rank: int | None = typer.Option(None, "--rank", help=f"Rank (default {CHECK_RANK})."),
    sets: list[str] | None = typer.Option(None, "--set", help="knob=value for the config."),
    identity_tol: float = typer.Option(1e-5, "--identity-tol",
                                       help="Largest identity error accepted at init."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table."),
):
    """Check variants against the variant contract on the test model and print the figures.

    Identity at init, gradients only on (and on every) adapter tensor, a training step that
    changes the output, save -> load, detach bit for bit; PEFT parity and merge exactness where
    the variant declares them. A failed check is one line naming what broke, exit code 1.
    Example: lora-lite check lora --quantize 4bit,8bit
    """
    import lora_lite as ll
    names = sorted(ll.variants()) if variants == ["all"] else list(variants)
    bases = _bases(quantize)
    figures = [run_check(n, bases, rank=rank, sets=parse_sets(sets), identity_tol=identity_tol)
               for n in names]
    if as_json:
        print_json({"bases": bases, "variants": figures})
    elif markdown:
        console.print(_markdown([figures_row(f) for f in figures], bases), highlight=False,
                      soft_wrap=True, markup=False)
    else:
        console.print(_table([figures_row(f) for f in figures], bases))
