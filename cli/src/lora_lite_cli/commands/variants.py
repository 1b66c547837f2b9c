"""``lora-lite variants``: every installed adapter variant, where it comes from, what it does."""
from __future__ import annotations

import dataclasses

import typer
from rich.markup import escape
from rich.table import Table

from ..app import app, console, handle_errors, warn
from ..output import jsonable, print_json


def variant_info(name, cls) -> dict:
    """What the CLI shows about one variant (plain data, also the --json record)."""
    import lora_lite as ll
    from lora_lite.plugins import variant_origin

    from ..defaults import variant_defaults
    origin = variant_origin(name)
    defaults = {f.name: f.default for f in dataclasses.fields(cls.config)}
    uses_rank = bool(cls.config.uses_rank)
    return {
        "name": name,
        "distribution": origin.distribution,
        "version": origin.version,
        "hook": ll.hook_kind(cls),
        # under the default config; `_by_config`: the config decides (e.g. an opt-in rewrite_base)
        "rewrites_weight": ll.rewrites_base(cls, cls.config()),
        "rewrites_weight_by_config": callable(cls.rewrites_weight),
        "needs_calibration": bool(cls.needs_calibration),
        "supports_quantized": bool(cls.supports_quantized),
        "uses_rank": uses_rank,
        "r": defaults.get("r") if uses_rank else None,
        "alpha": defaults.get("alpha") if uses_rank else None,
        "knobs": jsonable(cls.config.knobs()),
        "paper": cls.paper or "",
        "train_defaults": jsonable(variant_defaults(name)),  # what `train` uses; `source`: its own keys
    }


def _rewrites_label(row) -> str:
    if row["rewrites_weight_by_config"]:
        return "yes (by config)" if row["rewrites_weight"] else "no (opt-in)"
    return _yes(row["rewrites_weight"])


def safe_variant_info(name, cls, problems: list) -> dict | None:
    """``variant_info``, or None with the reason appended to ``problems`` when the variant's
    class misbehaves (a raising property, a malformed train_defaults, ...)."""
    try:
        return variant_info(name, cls)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # a broken plugin must not take the listing down
        from lora_lite.plugins import variant_origin
        dist = variant_origin(name).distribution
        problems.append({"distribution": dist, "error": f"variant {name!r} cannot be described: "
                         f"{type(e).__name__}: {e}", "fix": f"fix or uninstall {dist}"})
        return None


def problem_info(problem) -> dict:
    return {"distribution": problem.distribution, "error": problem.error, "fix": problem.hint}


def _yes(flag: bool) -> str:
    return "[green]yes[/]" if flag else "no"


@app.command("variants")
@handle_errors
def variants_command(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """List every installed adapter variant: plugin, hook kind, what it needs, its knobs, and
    (with --json) the training defaults `train` uses for it.

    Plugins that failed to load are listed as warnings naming the distribution and the fix.
    """
    import lora_lite as ll
    found = ll.variants()
    problems = [problem_info(p) for p in ll.problems()]
    rows = [r for name, cls in sorted(found.items())
            if (r := safe_variant_info(name, cls, problems)) is not None]
    if as_json:
        print_json({"variants": rows, "problems": problems})
        return
    if not rows:
        console.print("No adapter variants are installed. Install the built-in ones with "
                      "[bold]lora-lite install 'lora-lite\\[all]'[/] (or any plugin package)")
    else:
        table = Table(title=f"{len(rows)} installed variant(s)", title_justify="left")
        table.add_column("variant", no_wrap=True)
        table.add_column("plugin", min_width=19)
        table.add_column("hook", no_wrap=True)
        table.add_column("rewrites W")
        table.add_column("calib")
        table.add_column("4/8bit")
        for r in rows:
            table.add_row(r["name"], f"{r['distribution']} {r['version']}", r["hook"],
                          _rewrites_label(r),
                          "[yellow]needs[/]" if r["needs_calibration"] else "no",
                          _yes(r["supports_quantized"]))
        console.print(table)
        console.print("Knobs and defaults (change with --set knob=value):")
        for r in rows:
            knobs = [f"{k}={v}" for k, v in r["knobs"].items()]
            if r["uses_rank"]:
                knobs = [f"r={r['r']}", f"alpha={r['alpha']:g}"] + knobs
            console.print(f"  [bold]{r['name']}[/]: {escape(', '.join(knobs)) or '(none)'}",
                          highlight=False)
    for p in problems:
        warn(f"plugin {p['distribution']!r}: {p['error']} -> {p['fix']}")
